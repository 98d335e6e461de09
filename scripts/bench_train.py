"""`tw bench-train`: one training step of each kind against its floor, per model pair.

**Our step** is what the trainers run, through the library functions they call, on a config with the
sizes of the pair's own configs (``num_envs``, ``updates_per_batch``, ``replay_per_update``,
``bc_batch_size``; GKD's ``batch_size`` and ``updates_per_batch``):

- **bc**: :func:`agents.train.phase1_step`: the prompts, the oracle (the teacher's greedy decode, the
  student's KL-ranking forward, the ranking), the training forward, the BC loss, backward, clip, step.
- **pcl**: one batch of ``train_phase2``'s loop (:func:`pcl_batch`): the on-policy rollout in the vector
  env, the oracle episode, the ``updates_per_batch`` updates of policy and value net on on-policy +
  oracle + replayed episodes (rewards recomputed), the dual step and the batch's logging. Selection
  and checkpoints, which run every ``eval_every``/``checkpoint_every`` batches, are not timed.
- **gkd**: ``tw gkd``'s batch (``_GKDRun.train_batch``): student samples and teacher outputs, the
  teacher's logits, ``updates_per_batch`` reverse-KL updates, logging.

**Its floor** is the same number of forward and backward passes over the same tokens and batch
shapes (those the step just produced: its prompts, its output widths, its update batches) as plain
batched transformers calls, and nothing else: a teacher or student decode of T tokens is
``model.generate`` with its KV cache and exactly T new tokens; a forward over given tokens is one
teacher-forced forward (the family's ``teacher_forced_logits``); a training forward adds one
backward and one AdamW step per update (the value net: its LM without the LM head, a scalar head).
Per step:

- bc: teacher decode on C^(T) (the oracle's tokens); student forward without gradients (the KL
  ranking); student forward + backward + step.
- pcl: teacher decode and student decode of the rollout's length (the env scores every step with the
  teacher; the policy steps once per token); teacher decode of the oracle's length and the student's
  ranking forward; per update, student and value forwards on the update's batch, one backward, two steps.
- gkd: student decode of the samples' length, teacher decode of its outputs' length (its logits come
  with its decode), the teacher's forward on the student samples; per update, student forward +
  backward + step.

Step and floor alternate (A B A B ...) after one warm-up each; medians are reported, and the ratio
step ÷ floor. With ``breakdown`` one more step and floor run with their parts wrapped
(:class:`Probe`: exclusive wall time per part of the step, split by what ran inside it). The last
line printed is the JSON ``{pair: {"bc": ratio, "pcl": ratio, "gkd": ratio}}``.

    tw bench-train --repeats 5 --output runs/bench-train.json
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

import agents.gkd
import agents.train
import agents.trajectories
from agents.gkd import GKDConfig, _GKDRun
from agents.policy import PolicyRollout
from agents.run import start_run
from agents.train import (
    PCLState,
    Phase1State,
    Setup,
    TrainConfig,
    log_phase2_batch,
    make_setup,
    phase1_step,
)
from agents.trajectories import ReplayBuffer, Trajectories
from scripts.bench_env import _generate, finite_ratio, interleaved, machine_info, synchronize
from tw_env.atomic import write_json
from tw_env.families import family_of
from tw_env.models import resolve_device
from tw_env.task import Task

REPO = Path(__file__).resolve().parents[1]
STEPS = ("bc", "pcl", "gkd")
DEEN_MODELS = "configs/deen-models.json"  # the de→en pipeline's tokenizer and model sizes (tw train-mt)
_MODEL_PATHS = ("teacher", "student", "tokenizer", "data")


@dataclass(frozen=True)
class PairSpec:
    """A model pair: the configs whose sizes its steps take, and whether its models are built here."""

    train_config: str  # tw train's config (BC and PCL sizes), relative to the repository
    gkd_config: str  # tw gkd's config (GKD sizes)
    random_models: bool  # build DEEN_MODELS' architectures with random weights (no trained models here)


PAIRS = {
    "embedded": PairSpec("configs/synthetic.json", "configs/synthetic-gkd.json", False),
    "embedded-causal": PairSpec("configs/synthetic-causal.json", "configs/synthetic-causal-gkd.json", False),
    "deen-random": PairSpec("configs/deen.json", "configs/deen-gkd.json", True),
}


@dataclass
class BenchTrainConfig:
    """A BC, a PCL and a GKD batch, each against its floor of plain forward and backward passes (docs/benchmarks.md)."""

    models: list = field(default_factory=lambda: list(PAIRS))  # model pairs: "embedded" (the synthetic task's T5s), "embedded-causal" (its Llamas), "deen-random" (the de→en sizes of configs/deen-models.json, random weights)
    steps: list = field(default_factory=lambda: list(STEPS))  # which steps to time: "bc", "pcl", "gkd"
    env_kwargs: dict = field(default_factory=dict)  # overrides for every pair's task (teacher, student, tokenizer, data, ...)
    repeats: int = 5  # timed (step, floor) pairs per step, alternating after one warm-up each; medians
    bc_batch_size: int | None = None  # prompts per BC batch (None: the pair's training config)
    num_envs: int | None = None  # rollouts per PCL batch (None: the pair's training config)
    replay_per_update: int | None = None  # replayed episodes per PCL update (None: the pair's training config)
    gkd_batch_size: int | None = None  # prompts per GKD batch (None: the pair's GKD config)
    max_new_tokens: int | None = None  # episode and sample length (None: the pair's task)
    breakdown: bool = True  # time the parts of one more step and floor and print them
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    threads: int = 0  # torch CPU threads (0: each pair's config's, as tw train and tw gkd run it)
    seed: int = 0  # seeds the random de→en weights
    output: str | None = None  # optional JSON file with every timing and breakdown

    def validate(self) -> None:
        unknown = [m for m in self.models if m not in PAIRS] + [s for s in self.steps if s not in STEPS]
        if unknown or not self.models or not self.steps:
            raise ValueError(f"models must be among {list(PAIRS)} and steps among {list(STEPS)} (neither empty), "
                             f"got {self.models} and {self.steps}")
        sizes = (self.repeats, self.bc_batch_size, self.num_envs, self.gkd_batch_size, self.max_new_tokens)
        if any(n is not None and n < 1 for n in sizes) or (self.replay_per_update or 0) < 0 or self.threads < 0:
            raise ValueError("repeats and the batch sizes must be >= 1, replay_per_update and threads >= 0")


# ---------------------------------------------------------------------------------------------- probes
@dataclass(frozen=True)
class Target:
    """An attribute a :class:`Probe` wraps: a function of a module, a method of a class or of one object."""

    owner: Any  # the module, class or object that holds it
    name: str  # the attribute
    label: str  # the part or kind its time counts as (and the name its recorded calls go under)
    role: str  # "record" (calls kept for the floor; a part when timing), "part" (a stage) or "kind" (what runs)


@dataclass
class Call:
    arguments: dict[str, Any]  # the call's bound arguments
    result: Any


@dataclass
class _Frame:
    target: Target
    start: float  # perf_counter at the call
    inside: float = 0.0  # seconds spent in wrapped callees


_MISSING = object()


class Probe:
    """Wraps callables in place for a ``with`` block: keeps the calls of "record" targets (the shapes the
    floor repeats) and, when timing, charges each wrapped call's exclusive wall time to (the stages on
    the stack, the innermost kind), e.g. ("rollout", "teacher")."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.calls: dict[str, list[Call]] = defaultdict(list)
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self._stack: list[_Frame] = []

    def last(self, label: str) -> Call:
        return self.calls[label][-1]

    def fresh(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` with no calls kept from before."""
        self.calls.clear()
        fn()

    @contextmanager
    def installed(self, targets: list[Target], timing: bool) -> Iterator[None]:
        saved: list[tuple[Any, str, Any]] = []
        try:
            for target in {(id(t.owner), t.name): t for t in targets if timing or t.role == "record"}.values():
                saved.append((target.owner, target.name, vars(target.owner).get(target.name, _MISSING)))
                setattr(target.owner, target.name, self._wrap(getattr(target.owner, target.name), target, timing))
            yield
        finally:
            for owner, name, raw in reversed(saved):
                if raw is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, raw)

    def _wrap(self, fn: Callable[..., Any], target: Target, timing: bool) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = self._timed(fn, target, args, kwargs) if timing else fn(*args, **kwargs)
            if target.role == "record":
                self.calls[target.label].append(Call(inspect.signature(fn).bind(*args, **kwargs).arguments, result))
            return result
        return wrapper

    def _timed(self, fn: Callable[..., Any], target: Target, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        synchronize(self.device)
        frame = _Frame(target, time.perf_counter())
        self._stack.append(frame)
        try:
            return fn(*args, **kwargs)
        finally:
            synchronize(self.device)
            elapsed = time.perf_counter() - frame.start
            self.seconds[self._key()] += elapsed - frame.inside
            self._stack.pop()
            if self._stack:
                self._stack[-1].inside += elapsed

    def _key(self) -> tuple[str, str]:
        targets = [frame.target for frame in self._stack]
        stages = [t.label for t in targets if t.role != "kind"]
        kinds = [t.label for t in targets if t.role == "kind"]
        stage = " > ".join(dict.fromkeys(stages[1:] or stages[:1]))  # the root only where nothing else is
        return stage, kinds[-1] if kinds else "other"

    def breakdown(self, fn: Callable[[], Any], root: str) -> dict[str, dict[str, float]]:
        """Run ``fn`` once, timed: {stage: {kind: seconds}} (the root stage holds what no stage wraps)."""
        self.seconds.clear()
        self._timed(fn, Target(None, "", root, "part"), (), {})
        table: dict[str, dict[str, float]] = defaultdict(dict)
        for (stage, kind), seconds in self.seconds.items():
            table[stage][kind] = seconds
        return dict(table)


def model_kinds(model: nn.Module, label: str) -> list[Target]:
    """A model's forward and its top-level modules' (an encoder, a decoder, a head called alone) as ``label``."""
    return [Target(module, "forward", label, "kind") for module in (model, *model.children())]


def training_kinds(*optimizers: torch.optim.Optimizer) -> list[Target]:
    return [Target(torch.Tensor, "backward", "backward", "kind"),
            Target(torch.nn.utils, "clip_grad_norm_", "optimizer", "kind"),
            *(Target(o, "step", "optimizer", "kind") for o in optimizers)]


# ---------------------------------------------------------------------------------------------- the floor
@dataclass
class FloorModels:
    """The floor's own copies: the student LM with AdamW and, for PCL, the value net's LM without its LM
    head, a scalar head and AdamW (the step's models and optimisers are never touched)."""

    student: PreTrainedModel
    optimizers: list[torch.optim.Optimizer]
    value: PreTrainedModel | None = None
    value_head: nn.Linear | None = None

    @classmethod
    def of(cls, student: PreTrainedModel, value: PreTrainedModel | None = None) -> FloorModels:
        floor = cls(copy.deepcopy(student), [])
        floor.optimizers.append(torch.optim.AdamW(floor.student.parameters(), lr=1e-5))
        if value is not None:
            floor.value = copy.deepcopy(value)
            floor.value.set_output_embeddings(nn.Identity())  # final states, as the value net reads them
            floor.value_head = nn.Linear(value.config.hidden_size, 1).to(value.device)
            params = [*floor.value.parameters(), *floor.value_head.parameters()]
            floor.optimizers.append(torch.optim.AdamW(params, lr=1e-5))
        return floor

    def kinds(self) -> list[Target]:
        value = model_kinds(self.value, "value LM") if self.value is not None else []
        return [*model_kinds(self.student, "student LM"), *value, *training_kinds(*self.optimizers)]


def floor_decode(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> None:
    """``steps`` greedy tokens for right-padded prompts: ``generate`` with its KV cache."""
    _generate(model, ids, mask, steps)


@torch.no_grad()
def floor_score(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> None:
    """One teacher-forced forward over ``tokens`` without gradients."""
    family_of(model).teacher_forced_logits(model, ids, mask, tokens)


def floor_update(floor: FloorModels, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor,
                 trained: torch.Tensor) -> None:
    """Teacher-forced forwards of the student (and the value net, one more position) with gradients,
    one backward, one AdamW step each. The LMs run over the padded batch, as any batched call must; the
    loss (a log-softmax over V) reads the ``trained`` positions only, the tokens the step learns from."""
    family = family_of(floor.student)
    logits = family.teacher_forced_logits(floor.student, ids, mask, tokens).float()
    loss = torch.log_softmax(logits[trained], dim=-1).gather(-1, tokens[trained][:, None]).mean()
    if floor.value is not None and floor.value_head is not None:
        states = family.teacher_forced_logits(floor.value, ids, mask, nn.functional.pad(tokens, (0, 1)))
        loss = loss + floor.value_head(states).mean()
    for optimizer in floor.optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in floor.optimizers:
        optimizer.step()


def floor_stages() -> list[Target]:
    module = sys.modules[__name__]
    return [Target(module, "floor_decode", "decode", "part"), Target(module, "floor_score", "score", "part"),
            Target(module, "floor_update", "update", "part")]


# ---------------------------------------------------------------------------------------------- the steps
@dataclass
class PairContext:
    """What the steps of one model pair share."""

    config: BenchTrainConfig
    spec: PairSpec
    env_kwargs: dict[str, Any]
    folder: Path
    setup: Setup
    clone: Phase1State
    probe: Probe


@dataclass
class StepBench:
    """A step, its floor, the calls the floor reads (``records``), the breakdown's further wrappers
    (``parts``) and a description of the shapes the last step ran on."""

    step: Callable[[], Any]
    floor: Callable[[], None]
    records: list[Target]
    parts: list[Target]
    shapes: Callable[[], dict[str, Any]]
    close: Callable[[], None] = lambda: None


def pcl_batch(setup: Setup, state: PCLState) -> None:
    """One batch of ``train_phase2``'s loop: :func:`agents.train.pcl_batch` (episodes, updates, the dual
    step), then its logging."""
    on_policy, losses, _, (mu, sigma) = agents.train.pcl_batch(setup, state)
    log_phase2_batch(setup.writer, state.step, on_policy, losses, state.dual, mu, sigma, setup.config.reward_clip)
    state.step += 1


def _episodes(traj: Trajectories) -> dict[str, Any]:
    return {"rows": len(traj), "prompt_width": traj.prompt_ids.shape[1], "width": traj.state_ids.shape[1],
            "tokens": int(traj.mask.sum())}


def bc_bench(ctx: PairContext) -> StepBench:
    setup, clone, probe = ctx.setup, ctx.clone, ctx.probe
    floor, vocab = FloorModels.of(clone.policy.model), clone.policy.vocab_size

    def floor_step() -> None:
        call = probe.last("oracle")
        args, traj = call.arguments, call.result.trajectories
        ids, mask = args["prompt_ids"], args["prompt_mask"]
        teacher_ids, teacher_mask = args.get("teacher_prompts") or (ids, mask)
        tokens = traj.state_ids % vocab
        floor_decode(args["teacher"], teacher_ids, teacher_mask, tokens.shape[1])
        floor_score(floor.student, ids, mask, tokens)
        floor_update(floor, ids, mask, tokens, traj.mask)

    def shapes() -> dict[str, Any]:
        call = probe.last("oracle")
        teacher_ids = (call.arguments.get("teacher_prompts") or (call.arguments["prompt_ids"],))[0]
        return {"oracle": _episodes(call.result.trajectories), "teacher_prompt_width": teacher_ids.shape[1]}

    parts = [Target(Task, "prompts", "prompts", "part"), Target(Task, "teacher_prompts", "prompts", "part"),
             Target(agents.train, "phase1_loss", "loss", "kind"), Target(clone.policy, "forward", "policy heads", "kind"),
             *model_kinds(setup.task.teacher, "teacher"), *model_kinds(clone.policy.model, "student LM"),
             *training_kinds(clone.optimizer), *floor.kinds(), *floor_stages()]
    return StepBench(lambda: phase1_step(setup, clone), floor_step, [Target(agents.train, "oracle_batch", "oracle", "record")],
                     parts, shapes)


def pcl_bench(ctx: PairContext) -> StepBench:
    setup, probe = ctx.setup, ctx.probe
    state = PCLState.start(setup.config, ctx.folder / "phase1", setup.device, setup.envs, setup.dist)
    floor, vocab = FloorModels.of(state.policy.model, state.value.model), state.policy.vocab_size

    def floor_step() -> None:
        rollout, oracle_call = probe.last("rollout").result[0], probe.last("oracle")
        teacher, (teacher_ids, teacher_mask) = oracle_call.arguments["teacher"], oracle_call.arguments["teacher_prompts"]
        floor_decode(teacher, teacher_ids, teacher_mask, rollout.state_ids.shape[1])  # the env's teacher, every step
        floor_decode(floor.student, rollout.prompt_ids, rollout.prompt_mask, rollout.state_ids.shape[1])  # π, every step
        oracle = oracle_call.result.trajectories
        floor_decode(teacher, teacher_ids, teacher_mask, oracle.state_ids.shape[1])
        floor_score(floor.student, oracle.prompt_ids, oracle.prompt_mask, oracle.state_ids % vocab)
        for call in probe.calls["update"]:
            batch = call.arguments["batch"]
            floor_update(floor, batch.prompt_ids, batch.prompt_mask, batch.state_ids % vocab, batch.mask)

    def shapes() -> dict[str, Any]:
        return {"rollout": _episodes(probe.last("rollout").result[0]),
                "oracle": _episodes(probe.last("oracle").result.trajectories),
                "updates": [_episodes(c.arguments["batch"]) for c in probe.calls["update"]]}

    records = [Target(agents.train, "collect_on_policy", "rollout", "record"),
               Target(agents.train, "oracle_batch", "oracle", "record"), Target(agents.train, "pcl_update", "update", "record")]
    return StepBench(lambda: pcl_batch(setup, state), floor_step, records, pcl_parts(ctx, state) + floor.kinds(), shapes)


def pcl_parts(ctx: PairContext, state: PCLState) -> list[Target]:
    """The breakdown's stages and kinds of a PCL batch beyond its recorded calls."""
    train, setup = agents.train, ctx.setup
    stages = [Target(train, "episode_rewards", "rewards", "part"), Target(train, "log_phase2_batch", "log", "part"),
              Target(ReplayBuffer, "sample", "replay", "part"), Target(ReplayBuffer, "add", "replay", "part"),
              Target(Trajectories, "concat", "replay", "part"), Target(state.dual, "record", "dual", "part"),
              Target(state.dual, "step", "dual", "part"), Target(Task, "prompts", "prompts", "part"),
              Target(Task, "teacher_prompts", "prompts", "part")]
    kinds = [Target(setup.envs, "step", "env", "kind"), Target(setup.envs, "reset", "env", "kind"),
             Target(PolicyRollout, "logits", "policy heads", "kind"), Target(state.policy, "forward", "policy heads", "kind"),
             Target(state.value, "forward", "value head", "kind"), Target(train, "pcl_loss", "loss", "kind"),
             Target(agents.trajectories, "choose_actions", "sampling", "kind"),
             *model_kinds(setup.task.teacher, "teacher"), *model_kinds(state.policy.model, "student LM"),
             *model_kinds(state.value.model, "value LM"), *training_kinds(*state.optimizers)]
    return stages + kinds + floor_stages()


def gkd_bench(ctx: PairContext) -> StepBench:
    probe, config = ctx.probe, gkd_config(ctx)
    gkd = _GKDRun(config, start_run(config, config.output_dir, data_parallel=True))
    teacher, floor, steps = gkd.task.teacher, FloorModels.of(gkd.state.student), itertools.count()

    def floor_step() -> None:
        call = probe.last("samples")
        batch, n = call.result, call.arguments["n_student"]
        ids, mask, lengths = batch.prompt_ids, batch.prompt_mask, batch.mask.sum(dim=1)
        if n > 0:
            width = int(lengths[:n].max())
            floor_decode(floor.student, ids[:n], mask[:n], width)
            floor_score(teacher, ids[:n], mask[:n], batch.tokens[:n, :width])  # the teacher reads the samples
        if n < len(ids):
            floor_decode(teacher, ids[n:], mask[n:], int(lengths[n:].max()))  # its outputs, scored as decoded
        for _ in probe.calls["update"]:
            floor_update(floor, ids, mask, batch.tokens, batch.mask.bool())

    def shapes() -> dict[str, Any]:
        batch = probe.last("samples").result
        return {"rows": len(batch.tokens), "prompt_width": batch.prompt_ids.shape[1], "width": batch.tokens.shape[1],
                "student_rows": int(batch.from_student.sum()), "tokens": int(batch.mask.sum()),
                "updates": len(probe.calls["update"])}

    parts = [Target(Task, "plain_prompts", "prompts", "part"), Target(gkd, "log_batch", "log", "part"),
             Target(agents.gkd, "reverse_kl", "loss", "kind"), *model_kinds(teacher, "teacher"),
             *model_kinds(gkd.state.student, "student LM"), *training_kinds(gkd.state.optimizer), *floor.kinds(),
             *floor_stages()]
    records = [Target(agents.gkd, "collect", "samples", "record"), Target(agents.gkd, "gkd_update", "update", "record")]
    return StepBench(lambda: gkd.train_batch(next(steps)), floor_step, records, parts, shapes, gkd.writer.close)


BENCHES: dict[str, Callable[[PairContext], StepBench]] = {"bc": bc_bench, "pcl": pcl_bench, "gkd": gkd_bench}


# ---------------------------------------------------------------------------------------------- the pairs
def _read_json(path: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((REPO / path).read_text())
    return loaded


def train_config(config: BenchTrainConfig, spec: PairSpec, env_kwargs: dict[str, Any], folder: Path) -> TrainConfig:
    """The pair's tw train config with the bench's overrides; nothing is selected or checkpointed."""
    sizes = {"bc_batch_size": config.bc_batch_size, "num_envs": config.num_envs,
             "replay_per_update": config.replay_per_update, "max_new_tokens": config.max_new_tokens}
    return TrainConfig(**{**_read_json(spec.train_config), **_common(config, env_kwargs, folder / "train"),
                          "settle_evaluations": 0,  # evaluations are off here, so is the stop rule that reads them
                          **{k: v for k, v in sizes.items() if v is not None}})


def gkd_config(ctx: PairContext) -> GKDConfig:
    """The pair's tw gkd config with the bench's overrides."""
    config = ctx.config
    sizes = {"batch_size": config.gkd_batch_size, "max_new_tokens": config.max_new_tokens}
    return GKDConfig(**{**_read_json(ctx.spec.gkd_config), **_common(config, ctx.env_kwargs, ctx.folder / "gkd"),
                        **{k: v for k, v in sizes.items() if v is not None}})


def _common(config: BenchTrainConfig, env_kwargs: dict[str, Any], out: Path) -> dict[str, Any]:
    threads = {"threads": config.threads} if config.threads else {}
    return {"env_kwargs": env_kwargs, "output_dir": str(out), "device": config.device, "eval_every": 0,
            "eval_examples": 8, "checkpoint_every": 10**9, **threads}


def deen_random_models(folder: Path, seed: int) -> dict[str, str]:
    """The de→en pipeline's parts as ``tw train-mt`` makes them from configs/deen-models.json, with random
    weights: its BPE tokenizer trained on its training text (seconds), its teacher and student
    architectures, its task data folder (train and selection rows)."""
    from transformers import T5ForConditionalGeneration  # tw train-mt's architecture

    from scripts.train_translation import (
        TranslationConfig,
        read_pairs,
        t5_config,
        train_tokenizer,
        write_task_data,
    )
    from tw_env.synthetic import padded_vocab_size

    mt = TranslationConfig(**_read_json(DEEN_MODELS))
    mt.train_data, mt.validation_data = str(REPO / mt.train_data), str(REPO / mt.validation_data)
    for path in (mt.train_data, mt.validation_data):
        if not Path(path).is_file():
            raise FileNotFoundError(f"deen-random reads the de→en text at '{path}' ({DEEN_MODELS}); it is missing")
    pairs = read_pairs(mt.train_data, mt.source_field, mt.target_field, mt.corpora)
    tokenizer = train_tokenizer([text for pair in pairs for text in pair], mt.vocab_size)
    tokenizer.save_pretrained(folder / "tokenizer")
    for offset, role in enumerate(("teacher", "student")):
        torch.manual_seed(seed + offset)
        T5ForConditionalGeneration(t5_config(getattr(mt, role), padded_vocab_size(tokenizer))).save_pretrained(folder / role)
    write_task_data(mt, folder / "data")
    return {part: str(folder / part) for part in _MODEL_PATHS}


def pair_env_kwargs(config: BenchTrainConfig, spec: PairSpec, folder: Path) -> dict[str, Any]:
    """The task keywords of the pair's training config (its GKD config reads the same task), its random
    models where it has them, and the bench's overrides."""
    env_kwargs = dict(_read_json(spec.train_config).get("env_kwargs", {}))
    if spec.random_models and not all(config.env_kwargs.get(k) for k in _MODEL_PATHS):
        env_kwargs.update(deen_random_models(folder / "models", config.seed))
    return {**env_kwargs, **config.env_kwargs}


def describe(name: str, spec: PairSpec, config: BenchTrainConfig, setup: Setup, policy: Any) -> str:
    def millions(model: nn.Module) -> str:
        return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"

    given = [k for k in _MODEL_PATHS if config.env_kwargs.get(k)]
    source = (f"given {', '.join(given)}" if given else "random weights, the architectures and BPE tokenizer "
              "of configs/deen-models.json (for the trained models: --env-kwargs with their folders)" if spec.random_models
              else "trained, cached by tw_env.synthetic")
    return (f"{name} ({setup.config.env_id}; {source}): {setup.task.family.name}, teacher {millions(setup.task.teacher)}, "
            f"student {millions(policy.model)} parameters, V {policy.vocab_size}, up to {setup.task.max_new_tokens} "
            f"tokens; sizes of {spec.train_config} and {spec.gkd_config}")


# ---------------------------------------------------------------------------------------------- run
def measure(bench: StepBench, probe: Probe, config: BenchTrainConfig) -> dict[str, Any]:
    """Step and floor alternating, medians and their ratio; then, optionally, one timed breakdown of each."""
    with probe.installed(bench.records, timing=False):
        seconds = interleaved({"step": lambda: probe.fresh(bench.step), "floor": bench.floor}, config.repeats,
                              probe.device)
        shapes = bench.shapes()
    median = {name: statistics.median(values) for name, values in seconds.items()}
    result: dict[str, Any] = {"shapes": shapes, "seconds": seconds, "median_seconds": median,
                              "ratio": finite_ratio(median["step"], median["floor"])}
    if config.breakdown:
        with probe.installed(bench.records + bench.parts, timing=True):
            result["breakdown"] = {"step": probe.breakdown(lambda: probe.fresh(bench.step), "(step)"),
                                   "floor": probe.breakdown(bench.floor, "(floor)")}
    bench.close()
    return result


def bench_pair(name: str, config: BenchTrainConfig, folder: Path) -> dict[str, Any]:
    spec = PAIRS[name]
    env_kwargs = pair_env_kwargs(config, spec, folder)
    setup = make_setup(train_config(config, spec, env_kwargs, folder))
    try:
        clone = Phase1State.start(setup, folder / "phase1-checkpoints")
        clone.policy.save(folder / "phase1")  # where PCL starts
        description = describe(name, spec, config, setup, clone.policy)
        print(f"== {description}", flush=True)
        ctx = PairContext(config, spec, env_kwargs, folder, setup, clone, Probe(setup.device))
        steps = {}
        for step in config.steps:
            steps[step] = measure(BENCHES[step](ctx), ctx.probe, config)
            print_step(step, steps[step], config.repeats)
        return {"description": description, "steps": steps}
    finally:
        setup.writer.close()
        setup.envs.close()


def print_step(step: str, result: dict[str, Any], repeats: int) -> None:
    median = result["median_seconds"]
    print(f"{step}: step {median['step']:.3f} s, floor {median['floor']:.3f} s, step ÷ floor {result['ratio']:.2f} "
          f"(medians of {repeats}); shapes {json.dumps(result['shapes'])}", flush=True)
    for which, table in result.get("breakdown", {}).items():
        total = sum(s for kinds in table.values() for s in kinds.values())
        print(f"  {which} breakdown ({total:.3f} s, one run; seconds inside each stage, by what ran):")
        for stage, kinds in sorted(table.items(), key=lambda item: -sum(item[1].values())):
            spent = sum(kinds.values())
            inside = ", ".join(f"{kind} {s:.3f}" for kind, s in sorted(kinds.items(), key=lambda item: -item[1]))
            print(f"    {stage:<20}{spent:8.3f} s {spent / max(total, 1e-12):5.0%}  {inside}")


def run(config: BenchTrainConfig) -> dict[str, Any]:
    """Time every step of every pair against its floor; print the breakdowns and, last, the ratios as JSON."""
    from datasets.utils.logging import disable_progress_bar
    from transformers.utils import logging as hf_logging

    config.validate()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # loading and saving bars: the output is the breakdowns
    disable_progress_bar()
    pairs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tw-bench-train-") as tmp:
        for name in config.models:
            pairs[name] = bench_pair(name, config, Path(tmp) / name)
    device = resolve_device(config.device)
    ratios = {name: {step: r["ratio"] for step, r in pair["steps"].items()} for name, pair in pairs.items()}
    result = {"benchmark": "train", "config": dataclasses.asdict(config), "machine": machine_info(device),
              "pairs": pairs, "ratios": ratios}
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        write_json(config.output, result)
    print(f"machine: {json.dumps(result['machine'])}")
    print(json.dumps(ratios))
    return result


if __name__ == "__main__":
    from scripts.cli import main

    raise SystemExit(main(["bench-train", *__import__("sys").argv[1:]]))
