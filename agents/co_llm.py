"""`tw co-llm`: train Co-LLM's deferral router for a task's student–teacher pair (a baseline for `tw eval`).

Co-LLM (Shen, Lang, Wang, Sontag, "Learning to Decode Collaboratively with Multiple Language Models",
ACL 2024; code clinicalml/co-llm) learns, with no label of who should write, a per-token probability
P(Z_t = 1) that the assistant (our teacher) writes token t, from the reference outputs of the training
split. Two phases, as the official code runs them:

1. **Initialisation** (``init_batches``; ``collm/dataset/initialization.py`` and
   ``search_deferral_initialization_v1``): the deferral head alone, the student frozen, fitted by binary
   cross-entropy to pseudo-labels that are 1 where the teacher's argmax is the reference token and the
   student's is not (:func:`~agents.objectives.collm_pseudo_labels`).
2. **Marginal likelihood** (``batches``; ``DeferralTrainerV1``): the deferral head and, with
   ``train_student`` (the paper's main setting), the student, on −log Σ_z p(z) p_z(x_t) over the reference
   tokens, the teacher frozen (:func:`~agents.objectives.collm_marginal_nll`).

The prompt is the task's plain prompt without a budget (``prompt``, as `tw gkd`'s): Co-LLM is not told a
budget; its teacher use is set at test time by the deferral threshold η, calibrated per target fraction
on selection rows by `tw eval`. Selection keeps the router with the lowest marginal NLL on
``eval_examples`` validation rows (the official runs keep Trainer's checkpoints by validation loss).
Checkpointed and resumed exactly; data-parallel under torchrun as `tw gkd` is.

Reads top to bottom: the config, the reference batch, the two losses, the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import tw_env  # noqa: F401  (registers the tasks)
from agents import checkpoint as ckpt
from agents.distributed import (
    Distributed,
    all_gather_objects,
    all_sum,
    barrier,
    check_replicas,
    data_parallel_loss_scale,
    draw_examples,
    rank_part,
    rank_seed,
    rows_per_rank,
    shard,
    summary_writer,
    wrap,
)
from agents.evaluation import seeded_subset
from agents.objectives import collm_marginal_nll, collm_pseudo_labels
from agents.routers import CoLLMRouter
from agents.run import (
    Run,
    Throughput,
    check_selection_data,
    end_report,
    load_tasks,
    start_run,
    student_source,
)
from tw_env.families import family_of
from tw_env.models import check_same_vocabulary, load_model, output_vocab_size
from tw_env.prompts import PLAIN_TEMPLATE, check_template
from tw_env.task import Task
from tw_env.tasks import Example


@dataclass
class CoLLMConfig:
    """Everything `tw co-llm` needs (defaults follow the official code where it has one)."""

    env_id: str = "TrainingWheels-Synthetic-v0"  # a registered Training Wheels task (its teacher, data, metric)
    env_kwargs: dict = field(default_factory=dict)  # overrides for gym.make: teacher, student, tokenizer, data, ...
    eval_env_kwargs: dict = field(default_factory=dict)  # extra overrides for the selection split only
    allow_selection_on_training_data: bool = False  # select on the training examples when both read one source (warns)
    student: str | None = None  # the student LM the router reads (hub id or directory); default: the task's student
    output_dir: str = "runs/co-llm"  # checkpoints, TensorBoard logs, best/ (the router), summary.json
    prompt: str = PLAIN_TEMPLATE  # prompt template of student and teacher: no budget (tw eval's plain_prompt must match)
    seed: int = 0  # seeds data order and the selection subset
    device: str = "auto"  # "cpu", "cuda" or "auto"
    threads: int = 0  # torch CPU threads (0: torch's default)
    init_batches: int = 100  # phase 1: the deferral head alone on the pseudo-labels (BCE), student frozen
    init_lr: float = 1e-3  # phase-1 learning rate (AdamW, no weight decay)
    batches: int = 1000  # phase 2: marginal-likelihood batches
    batch_size: int = 32  # reference outputs per batch
    lr: float = 1e-4  # phase-2 AdamW learning rate (student and head)
    weight_decay: float = 1e-5  # phase-2 AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clip (0: off)
    train_student: bool = True  # phase 2 also fine-tunes the student (the paper's main setting); false: the head only
    eval_every: int = 100  # batches between selection evaluations (0: only at the end)
    eval_examples: int = 512  # selection examples (a seeded random subset of eval_split)
    eval_split: str = "validation"  # the selection split
    checkpoint_every: int = 100  # batches between resumable checkpoints
    keep_checkpoints: int = 2  # resumable checkpoints kept on disk
    check_replicas: bool = False  # data-parallel runs: verify after every update that all ranks hold identical weights

    def validate(self) -> None:
        for name, minimum in (("init_batches", 0), ("batches", 0), ("eval_every", 0), ("threads", 0), ("batch_size", 1),
                              ("eval_examples", 1), ("checkpoint_every", 1), ("keep_checkpoints", 1)):
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        if not (self.lr > 0 and self.init_lr > 0) or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"need lr > 0, init_lr > 0, weight_decay >= 0 and grad_clip >= 0, got {self.lr}, "
                             f"{self.init_lr}, {self.weight_decay} and {self.grad_clip}")
        check_template(self.prompt, "prompt")


# ---------------------------------------------------------------------------------------------- data
@dataclass
class ReferenceBatch:
    """Plain prompts and their reference outputs (each ending in EOS unless cut at ``max_new_tokens``)."""

    prompt_ids: torch.Tensor  # [B, L]
    prompt_mask: torch.Tensor  # [B, L]
    tokens: torch.Tensor  # [B, T], pad after the end
    mask: torch.Tensor  # [B, T] bool


def reference_tokens(tokenizer: PreTrainedTokenizerBase, references: list[str], eos: int, max_new_tokens: int,
                     pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """References as output token ids: the text's tokens without special tokens, then EOS (what a decoder
    writes whatever the tokenizer appends by itself), cut at ``max_new_tokens``; right-padded with ``pad``."""
    rows = [(ids + [eos])[:max_new_tokens] for ids in tokenizer(references, add_special_tokens=False)["input_ids"]]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return tokens.to(device), mask.to(device)


def reference_batch(task: Task, examples: list[Example], template: str, device: torch.device) -> ReferenceBatch:
    ids, mask = task.plain_prompts([e.source for e in examples], template, device)
    pad = task.teacher.config.pad_token_id or 0
    tokens, valid = reference_tokens(task.tokenizer, [e.reference for e in examples], task.eos_token_id,
                                     task.max_new_tokens, int(pad), device)
    return ReferenceBatch(ids, mask, tokens, valid)


@torch.no_grad()
def teacher_target_logprobs(teacher: PreTrainedModel, batch: ReferenceBatch, vocab: int) -> torch.Tensor:
    """``[B, T]`` log p_teacher(x_t | x_<t) of each reference token (the frozen teacher, one forward)."""
    logits = family_of(teacher).teacher_forced_logits(teacher, batch.prompt_ids, batch.prompt_mask, batch.tokens)
    return F.log_softmax(logits[..., :vocab].float(), dim=-1).gather(-1, batch.tokens[..., None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------- losses
def initialisation_loss(router: CoLLMRouter, batch: ReferenceBatch, teacher_logits: torch.Tensor,
                        head: torch.nn.Module | None = None) -> torch.Tensor:
    """Phase 1: BCE of the deferral head on the pseudo-labels; the student's states are read without gradients.
    ``head`` runs the deferral head when it is not the router's own (its DDP wrapper)."""
    with torch.no_grad():
        states = router.states(batch.prompt_ids, batch.prompt_mask, batch.tokens)
        student_logits = router.student_logits(states)
    labels = collm_pseudo_labels(student_logits.float(), teacher_logits, batch.tokens)
    logits = (head or router.deferral)(states.to(router.deferral.weight.dtype)).squeeze(-1).float()
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (losses * batch.mask).sum() / batch.mask.sum().clamp(min=1)


def marginal_loss(router: CoLLMRouter, batch: ReferenceBatch, teacher_logprobs: torch.Tensor,
                  forward: torch.nn.Module | None = None) -> torch.Tensor:
    """Phase 2: Co-LLM's marginal NLL of the reference tokens (``forward``: the router's DDP wrapper)."""
    logits, deferral = (forward or router)(batch.prompt_ids, batch.prompt_mask, batch.tokens)
    student_logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, batch.tokens[..., None]).squeeze(-1)
    return collm_marginal_nll(deferral, student_logprobs, teacher_logprobs, batch.mask)


# ---------------------------------------------------------------------------------------------- run
def run(config: CoLLMConfig) -> dict:
    """Train the router; returns a summary (also OUTPUT_DIR/summary.json)."""
    check_selection_data(config.env_kwargs, config.eval_split, config.eval_env_kwargs,
                         config.allow_selection_on_training_data)
    training = _CoLLMRun(config, start_run(config, config.output_dir, data_parallel=True))
    training.train()
    summary = training.finish()
    if training.dist.is_main:
        print(end_of_training(config, summary))
    return summary


def end_of_training(config: CoLLMConfig, summary: dict[str, Any]) -> str:
    best, last, out = summary["best"], summary["evaluations"][-1], Path(config.output_dir)
    title = (f"tw co-llm: {summary['init_batches']} initialisation + {summary['batches']} marginal-likelihood batches "
             f"in {summary['seconds_this_run']:.0f} s; on {summary['eval_examples']} {config.eval_split} examples")
    table = [["router", "after batch", "marginal NLL", "mean P(teacher)", "pseudo-label rate"],
             *[[name, str(r["step"]), f"{r['nll']:.4f}", f"{r['defer_probability']:.3f}", f"{r['pseudo_label_rate']:.3f}"]
               for name, r in (("best (kept)", best), ("final", last))]]
    files = {"output": out, "best router": summary["best_dir"], "summary": out / "summary.json",
             "TensorBoard": out / "tensorboard"}
    return end_report(title, table, files)


@dataclass
class _CoLLMState:
    """What a run trains and resumes: the router, its two optimisers, the data RNG, the step, the selection."""

    config: CoLLMConfig
    router: CoLLMRouter
    rng: np.random.Generator
    step: int = 0
    selection: dict = field(default_factory=lambda: {"best": None, "evaluations": []})
    init_optimizer: torch.optim.AdamW = field(init=False)
    optimizer: torch.optim.AdamW = field(init=False)

    def __post_init__(self) -> None:
        self.make_optimizers()

    def make_optimizers(self) -> None:
        config, router = self.config, self.router
        router.model.requires_grad_(config.train_student)
        self.init_optimizer = torch.optim.AdamW(router.deferral.parameters(), lr=config.init_lr, weight_decay=0.0)
        self.optimizer = torch.optim.AdamW([p for p in router.parameters() if p.requires_grad], lr=config.lr,
                                           weight_decay=config.weight_decay)

    def resume(self, latest: Path, device: torch.device, dist: Distributed) -> None:
        self.router = CoLLMRouter.load(latest / "router", device=device)
        self.make_optimizers()
        ckpt.load_optimizer(latest / "init_optimizer.pt", self.init_optimizer)
        ckpt.load_optimizer(latest / "optimizer.pt", self.optimizer)
        state = ckpt.load_json(latest / "state.json")
        self.step, self.selection = state["step"], state["selection"]
        ckpt.restore_rng_state(rank_part(state, "rng", dist, latest), self.rng)  # last: loading must not move it

    def checkpoint(self, run_dir: Path, step: int, dist: Distributed) -> None:
        rank_rngs = all_gather_objects(ckpt.rng_state(self.rng), dist)
        state = {"step": step, "selection": self.selection, "rng": rank_rngs[0], "world_size": dist.world_size,
                 "rank_rng": rank_rngs}

        def write(folder: Path) -> None:
            self.router.save(folder / "router")
            ckpt.save_optimizer(folder / "init_optimizer.pt", self.init_optimizer)
            ckpt.save_optimizer(folder / "optimizer.pt", self.optimizer)
            ckpt.save_json(folder / "state.json", state)
        if dist.is_main:
            ckpt.write_checkpoint(run_dir, step, write, keep=self.config.keep_checkpoints)
        barrier(dist)


class _CoLLMRun:
    """One ``tw co-llm`` run: setup (and resume), the batches, selection, the summary."""

    def __init__(self, config: CoLLMConfig, run_: Run) -> None:
        self.config, self.run_ = config, run_
        device, dist = self.device, self.dist = run_.device, run_.dist
        self.rows = rows_per_rank(config.batch_size, dist.world_size, "batch_size")
        self.out, self.run_dir = Path(config.output_dir), Path(config.output_dir) / "checkpoints"
        tasks = load_tasks(config.env_id, config.env_kwargs, config.eval_split, config.eval_env_kwargs, device)
        self.task, self.eval_task = tasks.train, tasks.selection
        self.eval_examples = seeded_subset(self.eval_task.examples, config.eval_examples, config.seed)
        student = load_model(student_source(config.student, self.task), role="student", device=device).eval()
        self.vocab = check_same_vocabulary(self.task.teacher, output_vocab_size(student))
        self.state = _CoLLMState(config, CoLLMRouter(student).to(device), np.random.default_rng(rank_seed(config.seed, dist.rank)))
        torch.manual_seed(rank_seed(config.seed, dist.rank))
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is not None:
            self.state.resume(latest, device, dist)
        self.wrap()
        self.writer = summary_writer(str(self.out / "tensorboard"), dist)
        self.t0 = time.time()
        self.throughput = Throughput()

    def wrap(self) -> None:
        # The training forwards: gradients averaged over ranks (the head alone in phase 1).
        self.head = wrap(self.state.router.deferral, self.dist)
        self.trained = wrap(self.state.router, self.dist)

    @property
    def total(self) -> int:
        return self.config.init_batches + self.config.batches

    def train(self) -> None:
        config = self.config
        progress = tqdm(range(self.state.step, self.total), desc="Co-LLM", initial=self.state.step, total=self.total,
                        disable=not self.dist.is_main)
        for step in progress:
            loss = self.train_batch(step)
            progress.set_postfix(loss=f"{loss:.4f}")
            self.state.step = step + 1
            if config.eval_every and (step + 1) % config.eval_every == 0:
                self.evaluate_and_select(step + 1)
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < self.total:
                self.state.checkpoint(self.run_dir, step + 1, self.dist)

    def train_batch(self, step: int) -> float:
        config, state, task, dist = self.config, self.state, self.task, self.dist
        started = time.perf_counter()
        index = draw_examples(state.rng, len(task.examples), self.rows, dist)
        batch = reference_batch(task, [task.examples[i] for i in index], config.prompt, self.device)
        tokens = float(batch.mask.sum())
        all_tokens = all_sum(tokens, dist)
        scale = data_parallel_loss_scale(tokens, all_tokens, dist.world_size)
        initialising = step < config.init_batches
        if initialising:
            with torch.no_grad():
                teacher_logits = family_of(task.teacher).teacher_forced_logits(
                    task.teacher, batch.prompt_ids, batch.prompt_mask, batch.tokens)[..., : self.vocab].float()
            loss = initialisation_loss(state.router, batch, teacher_logits, self.head)
            optimizer, parameters = state.init_optimizer, list(state.router.deferral.parameters())
        else:
            loss = marginal_loss(state.router, batch, teacher_target_logprobs(task.teacher, batch, self.vocab), self.trained)
            optimizer, parameters = state.optimizer, [p for p in state.router.parameters() if p.requires_grad]
        optimizer.zero_grad(set_to_none=True)
        (loss * scale).backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        value = float(loss.detach())
        self.throughput.add(int(all_tokens), time.perf_counter() - started)
        if config.check_replicas:
            check_replicas(dist, list(state.router.parameters()), what=f"Co-LLM router after batch {step + 1}")
        self.writer.add_scalar("co_llm/initialisation_bce" if initialising else "co_llm/marginal_nll", value, step)
        return value

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Marginal NLL, mean P(Z = 1) and the pseudo-label rate over the selection examples (token means)."""
        router, task, config = self.state.router, self.eval_task, self.config
        sums = np.zeros(4)  # nll·n, P(defer)·n, labels, n
        local = shard(self.eval_examples, self.dist)
        for start in range(0, len(local), config.batch_size):
            batch = reference_batch(task, local[start : start + config.batch_size], config.prompt, self.device)
            teacher_logits = family_of(task.teacher).teacher_forced_logits(
                task.teacher, batch.prompt_ids, batch.prompt_mask, batch.tokens)[..., : self.vocab].float()
            teacher_logprobs = F.log_softmax(teacher_logits, dim=-1).gather(-1, batch.tokens[..., None]).squeeze(-1)
            logits, deferral = router(batch.prompt_ids, batch.prompt_mask, batch.tokens)
            student_logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, batch.tokens[..., None]).squeeze(-1)
            n = float(batch.mask.sum())
            sums += [float(collm_marginal_nll(deferral, student_logprobs, teacher_logprobs, batch.mask)) * n,
                     float((torch.sigmoid(deferral) * batch.mask).sum()),
                     float((collm_pseudo_labels(logits.float(), teacher_logits, batch.tokens) * batch.mask).sum()), n]
        total = [all_sum(float(x), self.dist) for x in sums]
        n = max(total[3], 1.0)
        return {"nll": total[0] / n, "defer_probability": total[1] / n, "pseudo_label_rate": total[2] / n}

    def evaluate_and_select(self, step: int) -> None:
        state = self.state
        record = {"step": step, **self.evaluate()}
        for key in ("nll", "defer_probability", "pseudo_label_rate"):
            self.writer.add_scalar(f"eval/{key}", record[key], step)
        best = state.selection["best"]
        if best is None or record["nll"] < best["nll"]:
            if self.dist.is_main:
                state.router.save(self.out / "best", self.task.tokenizer, self.router_record(record))
            best = record
        state.selection = {"best": best, "evaluations": state.selection["evaluations"] + [record]}
        barrier(self.dist)

    def router_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """What ``co_llm.json`` records beside the head: the prompt `tw eval` must use, and the selection."""
        return {"prompt": self.config.prompt, "env_id": self.config.env_id, "selected": record,
                "train_student": self.config.train_student}

    def finish(self) -> dict:
        config, state, dist, out = self.config, self.state, self.dist, self.out
        if not state.selection["evaluations"] or state.selection["evaluations"][-1]["step"] != self.total:
            self.evaluate_and_select(self.total)
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None or ckpt.load_json(latest / "state.json")["step"] != self.total:
            state.checkpoint(self.run_dir, self.total, dist)
        if dist.is_main:
            state.router.save(out / "final", self.task.tokenizer, self.router_record(state.selection["evaluations"][-1]))
        barrier(dist)
        self.writer.close()
        summary = {
            "init_batches": config.init_batches, "batches": config.batches, "prompt": config.prompt,
            "train_student": config.train_student, "seconds_this_run": time.time() - self.t0,
            "eval_examples": len(self.eval_examples), "best": state.selection["best"],
            "evaluations": state.selection["evaluations"], "best_dir": str(out / "best"), "final_dir": str(out / "final"),
            "processes": dist.world_size, **self.throughput.summary("reference"),
        }
        self.run_.write_summary(summary)
        return summary
