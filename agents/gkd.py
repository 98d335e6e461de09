"""GKD distillation of the student: DistillSpec's draft model, the paper's baseline (§3.1–3.3, §5.2).

Generalized Knowledge Distillation (Agarwal et al., 2023) as the paper uses it for DistillSpec:
every batch mixes trajectories sampled from the student (on-policy, temperature 1) with the
teacher's greedy outputs, by default one of each for every prompt of the batch (§5.2), and the student takes ``updates_per_batch`` gradient steps on the
token-wise reverse KL( π ‖ p ) over those trajectories. Dropout is off, as for our approach.
After training, the checkpoint with the best greedy output quality on ``eval_examples``
validation examples is kept in ``OUTPUT_DIR/best`` as a plain transformers model (safetensors)
with its tokenizer: the draft model of lossy speculative decoding (Appendix, Algorithm 1).

The prompt. DistillSpec's draft model is not told a teacher-use budget: it drafts and the teacher
verifies. Its prompt is the task's plain prompt without a budget keyword, ``"{instruction}:
{source}"`` (e.g. ``"translate German to English: Das Haus ist klein."``), tokenised with the
task's tokenizer and truncated to the task's ``max_prompt_length``. The teacher sees the same
prompt, here and at decoding time; the speculative decoder must encode prompts with
:func:`encode_prompts` and the same template (``summary.json`` records it).

Reads top to bottom: the config, prompts, trajectories, the loss and one update, evaluation and
checkpoint selection, then ``run``. ``tw gkd --config FILE`` runs it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import tw_env  # noqa: F401  (registers the tasks)
from agents import checkpoint as ckpt
from agents.decoding import generation_model
from agents.distributed import (
    SINGLE,
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
from agents.objectives import reverse_kl
from agents.run import (
    Run,
    Throughput,
    check_selection_data,
    end_report,
    load_tasks,
    start_run,
    student_source,
)
from tw_env.atomic import publish_dir, write_json
from tw_env.families import family_of
from tw_env.metrics import quality
from tw_env.models import check_same_vocabulary, load_model, output_vocab_size
from tw_env.prompts import PLAIN_TEMPLATE, check_template
from tw_env.task import Task
from tw_env.tasks import Example

PLAIN_PROMPT = PLAIN_TEMPLATE


@dataclass
class GKDConfig:
    """Everything `tw gkd` needs; defaults follow §3.3 and §5.2 of the paper."""

    env_id: str = "TrainingWheels-Synthetic-v0"  # a registered Training Wheels task (its teacher, data, metric)
    env_kwargs: dict = field(default_factory=dict)  # overrides for gym.make: teacher, student, tokenizer, data, ...
    eval_env_kwargs: dict = field(default_factory=dict)  # extra overrides for the evaluation split only (e.g. its data file)
    allow_selection_on_training_data: bool = False  # select on the training examples when both read one source (warns)
    student: str | None = None  # the student LM to distil (hub id or directory); default: the task's student
    output_dir: str = "runs/gkd"  # checkpoints, TensorBoard logs, best/ (the draft model), summary.json
    prompt: str = PLAIN_PROMPT  # prompt template of draft and teacher: no budget keyword (DistillSpec)
    seed: int = 0  # seeds data order, student sampling and the evaluation subset
    device: str = "auto"  # "cpu", "cuda" or "auto"
    threads: int = 0  # torch CPU threads (0: torch's default)
    max_new_tokens: int | None = None  # trajectory length (default: the task's)
    batches: int = 5200  # trajectory-sampling batches (§3.3: 5200, i.e. 20800 updates)
    batch_size: int = 32  # trajectories per batch
    updates_per_batch: int = 4  # gradient updates on each batch of trajectories (§3.3)
    pairing: str = "per_prompt"  # "per_prompt": each prompt gets a student sample and the teacher's output (§5.2); "split": see student_fraction
    student_fraction: float = 0.5  # with pairing "split": share of prompts with a student sample (GKD's λ), the rest get the teacher's
    lr: float = 1e-5  # AdamW learning rate (§5.2)
    weight_decay: float = 1e-5  # AdamW weight decay (§5.2)
    grad_clip: float = 1.0  # gradient-norm clip (0: off)
    eval_every: int = 250  # batches between validation evaluations (0: only at the end)
    eval_examples: int = 512  # validation examples for checkpoint selection (a seeded random subset)
    eval_split: str = "validation"  # split of the task used for selection
    checkpoint_every: int = 50  # batches between resumable checkpoints
    keep_checkpoints: int = 2  # resumable checkpoints kept on disk
    check_replicas: bool = False  # data-parallel runs: verify after every update that all ranks hold identical weights

    def validate(self) -> None:
        for name in ("batches", "eval_every", "threads", "batch_size", "updates_per_batch", "eval_examples",
                     "checkpoint_every", "keep_checkpoints"):
            minimum = 0 if name in ("batches", "eval_every", "threads") else 1
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        if self.pairing not in ("per_prompt", "split"):
            raise ValueError(f"pairing must be 'per_prompt' or 'split', got {self.pairing!r}")
        if not 0.0 <= self.student_fraction <= 1.0:
            raise ValueError(f"student_fraction must lie in [0, 1], got {self.student_fraction}")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0 and grad_clip >= 0, got {self.lr}, "
                             f"{self.weight_decay} and {self.grad_clip}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be None or >= 1, got {self.max_new_tokens}")
        check_template(self.prompt, "prompt")


# ---------------------------------------------------------------------------------------------- samples
@dataclass
class GKDBatch:
    """B output sequences for their prompts; positions up to and including the first EOS are valid."""

    prompt_ids: torch.Tensor  # [B, L] long
    prompt_mask: torch.Tensor  # [B, L] long
    tokens: torch.Tensor  # [B, T] long, 0 after the end
    mask: torch.Tensor  # [B, T] bool
    from_student: torch.Tensor  # [B] bool: sampled from the student (else the teacher's greedy output)
    # [B − n_student, T, V'] the teacher's logits at its own outputs, kept from its decode (None: no such rows)
    teacher_output_logits: torch.Tensor | None = None


@torch.no_grad()
def generate(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: int, sample: bool,
    with_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Outputs of ``model`` for right-padded prompts (without the decoder start token or a causal model's
    prompt), their valid positions and, ``with_logits``, the model's logits ``[B, T, V']`` at each of
    them (what its decode computed anyway; else ``None``)."""
    # Pure ancestral sampling at temperature 1: top_k=0 and top_p=1 switch off the generation
    # config's defaults (top_k=50), which would otherwise truncate the student's distribution.
    options = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    family = family_of(model)
    generate_ids, generate_mask = family.generation_inputs(ids, mask)  # left padding for a causal model
    generated = generation_model(model).generate(
        input_ids=generate_ids, attention_mask=generate_mask, max_new_tokens=max_new_tokens, num_beams=1,
        output_logits=with_logits, return_dict_in_generate=True, **options
    )
    tokens = family.generated_tokens(generated.sequences, ids.shape[1])
    is_eos = tokens == eos
    # Valid up to and including the first EOS; generate pads finished rows after it.
    valid = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) == 0
    logits = torch.stack(generated.logits, dim=1).to(ids.device) if with_logits else None
    return tokens.masked_fill(~valid, 0), valid, logits


def pair_prompts(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each prompt twice, for one student sample and one teacher output per prompt (§5.2).

    Returns the doubled ids and mask and ``n_student`` for :func:`collect` (the first copy of every prompt).
    """
    return torch.cat([ids, ids]), torch.cat([mask, mask]), ids.shape[0]


def collect(
    student: PreTrainedModel, teacher: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, n_student: int,
    max_new_tokens: int, eos: int,
) -> GKDBatch:
    """GKD's mixture: the first ``n_student`` prompts get a student sample, the others the teacher's output."""
    parts: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    teacher_logits = None
    if n_student > 0:
        tokens, valid, _ = generate(student, ids[:n_student], mask[:n_student], max_new_tokens, eos, sample=True)
        parts.append((tokens, valid, True))
    if n_student < ids.shape[0]:
        tokens, valid, teacher_logits = generate(teacher, ids[n_student:], mask[n_student:], max_new_tokens, eos,
                                                 sample=False, with_logits=True)
        parts.append((tokens, valid, False))
    width = max(tokens.shape[1] for tokens, _, _ in parts)
    pad = [torch.nn.functional.pad(tokens, (0, width - tokens.shape[1])) for tokens, _, _ in parts]
    valid_parts = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for _, v, _ in parts]
    from_student = torch.cat([torch.full((t.shape[0],), s, dtype=torch.bool) for t, _, s in parts])
    if teacher_logits is not None:
        teacher_logits = torch.nn.functional.pad(teacher_logits, (0, 0, 0, width - teacher_logits.shape[1]))
    return GKDBatch(ids, mask, torch.cat(pad), torch.cat(valid_parts), from_student.to(ids.device), teacher_logits)


@torch.no_grad()
def teacher_logits_on(teacher: PreTrainedModel, batch: GKDBatch, vocab: int) -> torch.Tensor:
    """``[B, T, V]`` the teacher's logits at every position of ``batch``: one teacher-forced forward over the
    student's samples, and for the teacher's own outputs the logits its decode already gave (``collect``
    keeps them; they equal a teacher-forced forward's up to float rounding, as a KV-cached decode does)."""
    n_student = int(batch.from_student.sum())
    if batch.teacher_output_logits is None or n_student == len(batch.from_student):
        return logits_on(teacher, batch)[..., :vocab].float()
    decoded = batch.teacher_output_logits[..., :vocab].float().to(batch.tokens.device)
    if n_student == 0:
        return decoded
    samples = GKDBatch(batch.prompt_ids[:n_student], batch.prompt_mask[:n_student], batch.tokens[:n_student],
                       batch.mask[:n_student], batch.from_student[:n_student])
    return torch.cat([logits_on(teacher, samples)[..., :vocab].float().to(decoded.device), decoded])


def logits_on(model: PreTrainedModel, batch: GKDBatch, forward: torch.nn.Module | None = None) -> torch.Tensor:
    """``[B, T, V]`` next-token logits of ``model`` at every position of the batch: one teacher-forced
    forward, as the model's family reads prompt and output (:meth:`~tw_env.families.ModelFamily.teacher_forced_logits`).

    ``forward`` is what runs the model, when it is not the model itself (its DDP wrapper).
    """
    return family_of(model).teacher_forced_logits(model, batch.prompt_ids, batch.prompt_mask, batch.tokens, forward)


# ---------------------------------------------------------------------------------------------- loss and update
def gkd_loss(
    student: PreTrainedModel, batch: GKDBatch, teacher_logits: torch.Tensor, forward: torch.nn.Module | None = None,
    teacher_log_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-wise reverse KL( π ‖ p ) averaged over the valid positions of every trajectory
    (``teacher_log_probs``: the teacher's log-softmax there, computed once per batch by the caller)."""
    return reverse_kl(logits_on(student, batch, forward).float(), teacher_logits, batch.mask, teacher_log_probs)


def gkd_update(
    student: PreTrainedModel, optimizer: torch.optim.Optimizer, batch: GKDBatch, teacher_logits: torch.Tensor,
    grad_clip: float, forward: torch.nn.Module | None = None, loss_scale: float = 1.0,
    teacher_log_probs: torch.Tensor | None = None,
) -> float:
    """One gradient step; the teacher's logits are computed once per batch and reused (it does not change).

    Data-parallel: ``forward`` is the student's DDP wrapper and ``loss_scale``
    (:func:`~agents.distributed.data_parallel_loss_scale`) makes the averaged gradient that of the
    token mean over every rank's trajectories. Returns this rank's loss.
    """
    loss = gkd_loss(student, batch, teacher_logits, forward, teacher_log_probs)
    optimizer.zero_grad(set_to_none=True)
    (loss * loss_scale).backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
    optimizer.step()
    return float(loss.item())


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    student: PreTrainedModel, task: Task, examples: list[Example], template: str, max_new_tokens: int, batch_size: int,
    dist: Distributed = SINGLE,
) -> float:
    """The task's metric of the student's greedy outputs alone: what the draft model knows by itself.

    Data-parallel: each rank decodes its shard; the hypotheses are gathered in order and every rank
    returns the score of the whole set.
    """
    hypotheses: list[str] = []
    local = shard(examples, dist)
    for start in range(0, len(local), batch_size):
        chunk = local[start : start + batch_size]
        ids, mask = task.plain_prompts([e.source for e in chunk], template, student.device)
        tokens, valid, _ = generate(student, ids, mask, max_new_tokens, task.eos_token_id, sample=False)
        hypotheses += task.tokenizer.batch_decode(tokens.masked_fill(~valid, 0), skip_special_tokens=True)
    hypotheses = [h for part in all_gather_objects(hypotheses, dist) for h in part]
    return quality(task.metric, hypotheses, [e.reference for e in examples])


def save_model_dir(
    student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, extra: dict[str, Any] | None = None
) -> None:
    """A plain transformers model directory (config, safetensors weights, tokenizer), published atomically."""

    def build(folder: Path) -> None:
        student.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if extra is not None:
            write_json(folder / "selection.json", extra)

    publish_dir(target, build)


def select(
    student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, score: float, step: int, selection: dict[str, Any],
    out: Path, write: bool = True,
) -> dict[str, Any]:
    """Keep the checkpoint with the best validation quality in OUTPUT_DIR/best (§3.3); ``write``: rank 0."""
    record = {"step": step, "quality": score}
    best = selection["best"]
    better = best is None or score > best["quality"]
    if better and write:
        save_model_dir(student, tokenizer, out / "best", record)
    return {"best": record if better else best, "evaluations": selection["evaluations"] + [record]}


# ---------------------------------------------------------------------------------------------- run
def run(config: GKDConfig) -> dict:
    """Distil the teacher into the student with GKD; returns a summary (also OUTPUT_DIR/summary.json)."""
    check_selection_data(config.env_kwargs, config.eval_split, config.eval_env_kwargs,
                         config.allow_selection_on_training_data)
    gkd = _GKDRun(config, start_run(config, config.output_dir, data_parallel=True))
    gkd.train()
    summary = gkd.finish()
    if gkd.dist.is_main:
        print(end_of_distillation(config, summary))
    return summary


def end_of_distillation(config: GKDConfig, summary: dict[str, Any]) -> str:
    """What `tw gkd` prints as it ends: the kept and the final draft model's quality; where the files are."""
    best, last, out = summary["best"], summary["evaluations"][-1], Path(config.output_dir)
    title = (f"tw gkd: {summary['batches']} batches ({summary['updates']} updates) in {summary['seconds_this_run']:.0f} s; "
             f"greedy quality of the draft alone on {summary['eval_examples']} {config.eval_split} examples")
    table = [["draft model", "after batch", f"quality ({summary['metric']})"],
             ["best (kept)", str(best["step"]), f"{best['quality']:.2f}"], ["final", str(last["step"]), f"{last['quality']:.2f}"]]
    files = {"output": out, "best draft": summary["best_dir"], "final draft": summary["final_dir"],
             "summary": out / "summary.json", "TensorBoard": out / "tensorboard"}
    return end_report(title, table, files)


def _load_student(config: GKDConfig, task: Task, device: torch.device) -> tuple[PreTrainedModel, int]:
    """The student to distil (``config.student``, else the task's), in eval mode, and the shared vocabulary size."""
    student = load_model(student_source(config.student, task), role="student", device=device)
    vocab = check_same_vocabulary(task.teacher, output_vocab_size(student))
    student.eval()  # dropout off (§5.2); gradients still flow
    return student, vocab


@dataclass
class _GKDState:
    """What a GKD run trains and resumes from a checkpoint: the student, its optimiser, the data RNG,
    the batches done and the checkpoint selection so far."""

    config: GKDConfig
    student: PreTrainedModel
    rng: np.random.Generator
    step: int = 0
    selection: dict = field(default_factory=lambda: {"best": None, "evaluations": []})
    optimizer: torch.optim.AdamW = field(init=False)

    def __post_init__(self) -> None:
        self.optimizer = self.make_optimizer()

    def make_optimizer(self) -> torch.optim.AdamW:
        return torch.optim.AdamW(self.student.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    def resume(self, latest: Path, device: torch.device, dist: Distributed) -> None:
        """Resume exactly from the checkpoint ``latest``: student, optimiser, RNG states, step, best so far."""
        self.student = load_model(latest / "student", role="student", device=device).eval()
        self.optimizer = self.make_optimizer()
        ckpt.load_optimizer(latest / "optimizer.pt", self.optimizer)
        state = ckpt.load_json(latest / "state.json")
        self.step, self.selection = state["step"], state["selection"]
        # last: loading must not move the restored RNGs
        ckpt.restore_rng_state(rank_part(state, "rng", dist, latest), self.rng)

    def checkpoint(self, run_dir: Path, step: int, dist: Distributed) -> None:
        """A resumable checkpoint after ``step`` batches (written by rank 0; every rank then reads the same)."""
        rank_rngs = all_gather_objects(ckpt.rng_state(self.rng), dist)
        state = {"step": step, "selection": self.selection, "rng": rank_rngs[0], "world_size": dist.world_size,
                 "rank_rng": rank_rngs}

        def write(folder: Path) -> None:
            self.student.save_pretrained(folder / "student")
            ckpt.save_optimizer(folder / "optimizer.pt", self.optimizer)
            ckpt.save_json(folder / "state.json", state)
        if dist.is_main:
            ckpt.write_checkpoint(run_dir, step, write, keep=self.config.keep_checkpoints)
        barrier(dist)  # every rank then reads the same latest checkpoint


class _GKDRun:
    """One ``tw gkd`` run: setup (and resume), the batches, the final evaluation and summary."""

    def __init__(self, config: GKDConfig, run_: Run) -> None:
        self.config, self.run_ = config, run_
        device, dist = self.device, self.dist = run_.device, run_.dist
        self.rows = rows_per_rank(config.batch_size, dist.world_size, "batch_size")  # this rank's prompts per batch
        self.out, self.run_dir = Path(config.output_dir), Path(config.output_dir) / "checkpoints"
        # The task (teacher, tokenizer, training examples, metric) and its evaluation split, which shares
        # the loaded teacher. GKD never steps an env.
        tasks = load_tasks(config.env_id, config.env_kwargs, config.eval_split, config.eval_env_kwargs, device,
                           max_new_tokens=config.max_new_tokens)
        self.task, self.eval_task = tasks.train, tasks.selection
        # A seeded random subset of the validation split (§3.3), the same for every evaluation.
        self.eval_examples = seeded_subset(self.eval_task.examples, config.eval_examples, config.seed)
        student, self.vocab = _load_student(config, self.task, device)
        self.state = _GKDState(config, student, np.random.default_rng(rank_seed(config.seed, dist.rank)))
        torch.manual_seed(rank_seed(config.seed, dist.rank))
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is not None:
            self.state.resume(latest, device, dist)
        self.trained = wrap(self.state.student, dist)  # the training forward: gradients averaged over ranks
        self.writer = summary_writer(str(self.out / "tensorboard"), dist)
        self.n_student = math.floor(config.student_fraction * self.rows + 0.5)
        self.t0 = time.time()
        self.throughput = Throughput()

    def evaluate_and_select(self, step: int) -> None:
        config, state = self.config, self.state
        score = evaluate(state.student, self.eval_task, self.eval_examples, config.prompt, self.task.max_new_tokens,
                         config.batch_size, self.dist)
        self.writer.add_scalar("eval/quality", score, step)
        state.selection = select(state.student, self.task.tokenizer, score, step, state.selection, self.out,
                                 write=self.dist.is_main)

    def train(self) -> None:
        """The batches from the resumed step on, with evaluations and resumable checkpoints."""
        config = self.config
        progress = tqdm(range(self.state.step, config.batches), desc="GKD", initial=self.state.step,
                        total=config.batches, disable=not self.dist.is_main)
        for step in progress:
            losses = self.train_batch(step)
            progress.set_postfix(loss=f"{np.mean(losses):.4f}")
            # 3. Checkpoint selection on validation, and resumable checkpoints.
            if config.eval_every and (step + 1) % config.eval_every == 0:
                self.evaluate_and_select(step + 1)
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.batches:
                self.state.checkpoint(self.run_dir, step + 1, self.dist)

    def train_batch(self, step: int) -> list[float]:
        """One batch: trajectories, then ``updates_per_batch`` reverse-KL updates on them; their losses."""
        config, state, task, dist = self.config, self.state, self.task, self.dist
        student, device = state.student, self.device
        batch_start = time.perf_counter()
        # 1. Trajectories: student samples (on-policy) and teacher outputs for random training prompts
        #    (each rank: its batch_size / N prompts from its shard of the examples).
        index = draw_examples(state.rng, len(task.examples), self.rows, dist)
        ids, mask = task.plain_prompts([task.examples[i].source for i in index], config.prompt, device)
        n_student = self.n_student
        if config.pairing == "per_prompt":
            ids, mask, n_student = pair_prompts(ids, mask)
        batch = collect(student, task.teacher, ids, mask, n_student, task.max_new_tokens, task.eos_token_id)
        teacher_logits = teacher_logits_on(task.teacher, batch, self.vocab).to(device)
        # 2. Several reverse-KL updates on the same trajectories.
        tokens = float(batch.mask.sum())
        all_tokens = all_sum(tokens, dist)
        scale = data_parallel_loss_scale(tokens, all_tokens, dist.world_size)
        # The teacher's log-softmax at the valid positions, once for the batch's updates (it does not change).
        teacher_log_probs = torch.log_softmax(teacher_logits[batch.mask.bool()], dim=-1)
        losses = [gkd_update(student, state.optimizer, batch, teacher_logits, config.grad_clip, self.trained, scale,
                             teacher_log_probs) for _ in range(config.updates_per_batch)]
        self.throughput.add(int(all_tokens), time.perf_counter() - batch_start)
        if config.check_replicas:
            check_replicas(dist, list(student.parameters()), what=f"student after GKD batch {step + 1}")
        self.log_batch(step, batch, losses)
        return losses

    def log_batch(self, step: int, batch: GKDBatch, losses: list[float]) -> None:
        writer = self.writer
        writer.add_scalar("gkd/loss", float(np.mean(losses)), step)
        writer.add_scalar("gkd/loss_before_updates", losses[0], step)
        lengths = batch.mask.sum(dim=1).float()
        if batch.from_student.any():
            writer.add_scalar("gkd/student_length", float(lengths[batch.from_student].mean()), step)
        if (~batch.from_student).any():
            writer.add_scalar("gkd/teacher_length", float(lengths[~batch.from_student].mean()), step)

    def finish(self) -> dict:
        """Evaluate the final student (once), leave a checkpoint to resume from, save final/; the summary."""
        config, state, dist, out = self.config, self.state, self.dist, self.out
        # The final student is always evaluated (batches=0 evaluates the initial one), once.
        if not state.selection["evaluations"] or state.selection["evaluations"][-1]["step"] != config.batches:
            self.evaluate_and_select(config.batches)
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None or ckpt.load_json(latest / "state.json")["step"] != config.batches:
            state.checkpoint(self.run_dir, config.batches, dist)  # a finished run re-run (or extended) resumes from here
        if dist.is_main:
            save_model_dir(state.student, self.task.tokenizer, out / "final")
        barrier(dist)
        self.writer.close()
        summary = {
            "batches": config.batches, "updates": config.batches * config.updates_per_batch,
            "seconds_this_run": time.time() - self.t0, "prompt": config.prompt,
            "eval_examples": len(self.eval_examples), "metric": self.eval_task.metric,
            "best": state.selection["best"], "evaluations": state.selection["evaluations"],
            "best_dir": str(out / "best"), "final_dir": str(out / "final"), "processes": dist.world_size,
            **self.throughput.summary("trajectory"),
        }
        self.run_.write_summary(summary)
        return summary
