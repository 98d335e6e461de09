"""Training Wheels training: phase 1 (behaviour cloning of the KL-ranked oracle) and phase 2
(PCL on the Eq. 17 reward with one Lagrange multiplier per budget).

Reads top to bottom: the config, setup, phase 1, phase 2 (rollout → oracle → replay → four PCL
updates → λ step), checkpoint selection, checkpointing. ``tw train --config FILE`` runs it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch.optim import Optimizer
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import PreTrainedModel

import tw_env  # noqa: F401  (registers the tasks)
from agents import checkpoint as ckpt
from agents.distributed import (
    SINGLE,
    Distributed,
    NullWriter,
    all_gather_objects,
    all_sum,
    all_sum_counts,
    barrier,
    check_replicas,
    check_world_size,
    data_parallel_loss_scale,
    draw_examples,
    merge_reward_stats,
    rank_part,
    rank_seed,
    rows_per_rank,
    summary_writer,
    wrap,
)
from agents.evaluation import (
    BudgetResult,
    budgets_are_ceilings,
    evaluate_budgets,
    is_better_selection,
    quantile_call_thresholds,
    seeded_subset,
    selection_record,
    settle_point,
    ship_calibrated_call_rule,
)
from agents.lagrangian import LAGRANGE_RULES, BudgetDual, PIDGains, make_dual
from agents.objectives import pcl_loss, phase1_loss
from agents.policy import LM_BUDGET_HINTS, StudentPolicy, ValueNetwork, call_log_probability
from agents.run import (
    Run,
    Throughput,
    check_selection_data,
    end_report,
    load_tasks,
    phase1_policy_dir,
    start_run,
    student_source,
)
from agents.trajectories import (
    ReplayBuffer,
    Trajectories,
    collect_on_policy,
    oracle_batch,
)
from tw_env.atomic import publish_dir, write_json
from tw_env.models import load_model as load_lm
from tw_env.prompts import BUDGETS, budget_label, is_numeric_style
from tw_env.registration import budget_style_of
from tw_env.rewards import eq17_reward, interpolate_multiplier
from tw_env.task import Task
from tw_env.tasks import Example
from tw_env.vector_env import TeacherAssistedDecodingVectorEnv


@dataclass
class TrainConfig:
    """Everything `tw train` needs; defaults follow §3.3 and §5.2 of the paper."""

    env_id: str = "TrainingWheels-Synthetic-v0"  # a registered Training Wheels task
    env_kwargs: dict = field(default_factory=dict)  # overrides for gym.make: teacher, student, tokenizer, data, ...
    eval_env_kwargs: dict = field(default_factory=dict)  # further overrides for the selection split (e.g. its data file)
    student: str | None = None  # the student LM (hub id or directory); default: the task's student
    output_dir: str = "runs/tw"  # checkpoints, TensorBoard logs, the selected policy and results
    phase: str = "both"  # "bc" (phase 1 only), "pcl" (phase 2 only) or "both"
    init: str | None = None  # policy directory phase 2 starts from (default: OUTPUT_DIR/phase1)
    seed: int = 0  # seeds data order, budgets, sampling and initialisation
    device: str = "auto"  # "cpu", "cuda" or "auto"
    threads: int = 0  # torch CPU threads (0: torch's default)
    max_new_tokens: int | None = None  # episode length (default: the task's)
    budgets: list = field(default_factory=lambda: list(BUDGETS))  # the teacher-use budgets one model learns (with budget_range: the dual's knots and the evaluated budgets)
    budget_range: list | None = None  # [lo, hi]: draw each episode's budget uniformly from it (to 0.001; needs env_kwargs budget_style "numeric" or "numeric-fixed"); the dual's λ lives on `budgets` and is interpolated between them
    budget_step: float = 0.001  # the grid budget_range draws on (lo, lo + step, ..., hi)
    budget_holdout: list = field(default_factory=list)  # budgets of that grid never drawn (an evaluation of budgets unseen in training)
    # Phase 1 (§2.4.1)
    bc_batches: int = 200  # behaviour-cloning batches
    bc_batch_size: int = 32  # prompts per phase-1 batch
    bc_lr: float = 1e-4  # phase-1 learning rate
    bc_weight_decay: float = 1e-5  # phase-1 weight decay
    oracle_rounding: str = "floor"  # ⌊l·b⌋ oracle calls ("floor", the paper) or "stochastic" (expectation l·b)
    # Phase 2 (§2.4.2)
    pcl_batches: int = 5000  # PCL batches (one on-policy and one oracle episode per prompt each)
    num_envs: int = 32  # prompts per PCL batch = rows of the vector env
    updates_per_batch: int = 4  # gradient updates per batch, each on on-policy + oracle + replay episodes
    replay_capacity: int = 4096  # episodes kept in the replay buffer
    replay_per_update: int = 32  # replayed episodes in each update's mix
    horizon: int | None = None  # PCL sub-trajectory length d (None: the whole remaining episode)
    tau: float = 1.0  # entropy weight τ of the soft consistency (τ = 1 is Eq. 2; smaller is more stable)
    gamma: float = 1.0  # discount γ
    bootstrap_truncated: bool = False  # value V(s_L) after a truncated episode (False: 0, max_new_tokens is the horizon)
    rollout_temperature: float = 1.0  # sampling temperature of on-policy rollouts
    policy_lr: float = 1e-5  # policy learning rate (§5.2)
    policy_weight_decay: float = 1e-5  # policy weight decay (§5.2)
    policy_lr_decay_start: float = 1.0  # fraction of pcl_batches after which the policy lr falls linearly (1: constant lr, the paper)
    policy_lr_final: float = 1.0  # the policy lr at the last PCL batch, as a multiple of policy_lr (with policy_lr_decay_start < 1)
    value_lr: float = 1e-6  # value-network learning rate (§5.2)
    value_weight_decay: float = 1e-6  # value-network weight decay (§5.2)
    grad_clip: float = 1.0  # gradient-norm clip for both networks (0: off)
    lagrange_lr: float = 1e-2  # η of λ_b ← clip(λ_b + η(f_b − b), floor, cap) (§5.2)
    lagrange_cap: float = 2.0  # upper bound of λ_b (§5.2)
    lagrange_floor: float = 0.0  # lower bound of λ_b: 0 makes b a ceiling (the paper), < 0 a target (f = b)
    reward_clip: float = 2.0  # Eq. 17 rewards are clipped to [−clip, clip] (§2.4.2)
    lagrange_window: int = 4  # trailing on-policy batches whose teacher use drives λ
    lagrange_rule: str = "integral"  # "integral": the paper's step above on the trailing window; "pid": a PID controller on the smoothed fraction (docs/budget-control.md)
    pid_kp: float = 0.5  # lagrange_rule "pid": proportional gain on the smoothed error f̄ − b
    pid_ki: float = 0.05  # lagrange_rule "pid": integral gain per batch
    pid_kd: float = 0.0  # lagrange_rule "pid": derivative gain on the change of f̄ per batch
    pid_smoothing: float = 0.3  # lagrange_rule "pid": weight of the newest rollout in f̄'s moving averages (1: none)
    # Checkpoint selection (§3.3), logging, checkpointing
    eval_every: int = 250  # batches between validation evaluations (0: only at the end)
    eval_examples: int = 512  # validation examples for checkpoint selection (a seeded random subset, §3.3)
    eval_split: str = "validation"  # split of the task used for selection
    allow_selection_on_training_data: bool = False  # select on the training examples when both read one source (warns)
    delta: float = 0.02  # tolerance δ: f ≤ b + δ per budget (a ceiling, floor ≥ 0) or |f − b| ≤ δ (a target, floor < 0)
    checkpoint_every: int = 50  # batches between resumable checkpoints
    keep_checkpoints: int = 2  # resumable checkpoints kept on disk
    keep_evaluated_policies: bool = False  # also keep every evaluated policy (OUTPUT_DIR/phase2-evaluated/step-N) as a candidate for `tw eval`
    settle_evaluations: int = 0  # stop phase 2 once every budget has been within δ for this many consecutive evaluations and validation quality has stopped improving (0: run every batch)
    settle_min_gain: float = 0.0  # the quality gain (mean over budgets) over the earlier evaluations' best that still counts as improving
    calibrate_calls: bool = True  # after phase 2, calibrate best/'s call threshold per budget on the selection rows (call_rule.json), the rule tw eval and the decoders use by default; False: ship the raw rule π(<τ>) > ½
    calibration_tolerance: float = 0.005  # the threshold search stops once a budget's teacher fraction is this close
    read_budget_value: bool = False  # numeric budget styles only: the <τ> logit also reads the budget's value parsed from the prompt, through a piecewise-linear basis of b (ordinal by construction: an unseen budget is read between its neighbours; docs/any-budget.md)
    hide_budget_from_lm: bool = False  # with read_budget_value: the LM reads every prompt with the budget's number replaced by a placeholder token, so the budget reaches π only through the value read (docs/any-budget.md)
    lm_budget_hint: str = "none"  # with hide_budget_from_lm: "tenths" writes the budget rounded down to a tenth over the hidden number ("0.1" for 0.150), so the LM's tokens can change with a coarse budget while every budget of a tenth reads one string (docs/any-budget.md)
    prompt_read: str = "mean"  # how the policy pools its prompt states for the summary and the <τ> logit's prompt read: "mean" (the default) or "attention" (a learnt query, zeros at first: the mean)
    track_call_rule: bool = False  # at every evaluation, set the policy's call threshold per budget from its π(<τ>) on fresh training-prompt rollouts (the quantile that calls at b) and evaluate, select and ship with it; calibrate_calls is then not run
    refine_call_rule: bool = False  # with track_call_rule: after phase 2, re-fit best/'s tracked thresholds on the selection rows (a search per budget from its tracked c, kept where it lands within calibration_tolerance) and ship those; the tracked figures stay beside them in summary.json
    call_rule_greedy_passes: int = 0  # track_call_rule: after the sampled rollouts' quantile, this many fixed-point passes that roll out greedily under the thresholds (as the shipped decoder acts) and re-take the quantile over those states (docs/budget-control.md)
    call_rule_corpora: list[str] = field(default_factory=list)  # track_call_rule: draw its prompts from the training rows whose "corpus" field is one of these (empty: every training row); set it to the corpora the budgets are judged on, since teacher use is token-weighted and differs between corpora (de→en: its selection and test rows are Multi30k, its training rows Multi30k and Tatoeba; docs/budget-control.md)
    call_rule_fixed_prompts: bool = False  # track_call_rule: draw the same training prompts (and sampling seeds) at every evaluation instead of fresh ones, so that the tracked thresholds move between evaluations only as the policy does (common random numbers; docs/budget-control.md)
    call_rule_episodes: int = 1536  # track_call_rule: rollouts per evaluation over all budgets (rounded up to whole batches of num_envs); 384 left an sd of 0.018 in the evaluated teacher use on the embedded task, 1536 0.008 (docs/budget-control.md)
    call_rule_greedy_episodes: int = 0  # track_call_rule: rollouts of each greedy pass (call_rule_greedy_passes), 0: call_rule_episodes; the greedy pass sets the shipped thresholds, so its sample decides their noise (on de→en 256 prompts a budget moved the teacher use by about 0.02; docs/budget-control.md)
    check_replicas: bool = False  # data-parallel runs: verify after every update that all ranks hold identical weights, λ, μ_r, σ_r

    def validate(self) -> None:
        if self.phase not in ("bc", "pcl", "both"):
            raise ValueError(f"phase must be 'bc', 'pcl' or 'both', got {self.phase!r}")
        for name in ("bc_batches", "pcl_batches", "num_envs", "bc_batch_size", "updates_per_batch"):
            if getattr(self, name) < (0 if name.endswith("batches") else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.horizon is not None and self.horizon < 1:
            raise ValueError(f"horizon must be None or >= 1, got {self.horizon}")
        if self.tau < 0 or not 0 <= self.gamma <= 1:
            raise ValueError(f"tau must be >= 0 and gamma in [0, 1], got {self.tau} and {self.gamma}")
        if self.oracle_rounding not in ("floor", "stochastic"):
            raise ValueError(f"oracle_rounding must be 'floor' or 'stochastic', got {self.oracle_rounding!r}")
        if not self.budgets or any(not 0 <= b <= 1 for b in self.budgets):
            raise ValueError(f"budgets must be fractions in [0, 1], got {self.budgets}")
        if self.budget_range is not None:
            if len(self.budget_range) != 2 or not 0 <= self.budget_range[0] < self.budget_range[1] <= 1:
                raise ValueError(f"budget_range must be [lo, hi] with 0 <= lo < hi <= 1, got {self.budget_range}")
            steps = (self.budget_range[1] - self.budget_range[0]) / self.budget_step if self.budget_step > 0 else 0.5
            if (self.budget_step < 0.001 or abs(round(self.budget_step, 3) - self.budget_step) > 1e-9
                    or abs(steps - round(steps)) > 1e-6):
                raise ValueError(f"budget_step must be a multiple of 0.001 that divides budget_range "
                                 f"{self.budget_range} into whole steps, got {self.budget_step}")
            if not set(budget_grid(self)) - {round(float(b), 3) for b in self.budget_holdout}:
                raise ValueError(f"budget_holdout {self.budget_holdout} leaves no budget of budget_range to draw")
            if not is_numeric_style(budget_style_of(self.env_id, self.env_kwargs)):
                raise ValueError("budget_range draws budgets the Table 1 keywords cannot state: set "
                                 "env_kwargs budget_style 'numeric' or 'numeric-fixed' (and a tokenizer that reads digits)")
        elif self.budget_holdout:
            raise ValueError("budget_holdout removes budgets from budget_range's draws: set budget_range too")
        if self.lagrange_rule not in LAGRANGE_RULES:
            raise ValueError(f"lagrange_rule must be one of {list(LAGRANGE_RULES)}, got {self.lagrange_rule!r}")
        self.pid_gains()  # raises on a negative gain or a smoothing outside (0, 1]
        if self.settle_evaluations < 0 or self.settle_min_gain < 0:
            raise ValueError(f"settle_evaluations and settle_min_gain must be >= 0, got {self.settle_evaluations} "
                             f"and {self.settle_min_gain}")
        if self.read_budget_value and not is_numeric_style(budget_style_of(self.env_id, self.env_kwargs)):
            raise ValueError("read_budget_value reads the number a numeric prompt states: set env_kwargs budget_style "
                             f"'numeric' or 'numeric-fixed', got {budget_style_of(self.env_id, self.env_kwargs)!r}")
        if self.lm_budget_hint not in LM_BUDGET_HINTS or (self.lm_budget_hint != "none" and not self.hide_budget_from_lm):
            raise ValueError(f"lm_budget_hint must be one of {list(LM_BUDGET_HINTS)}, and other than 'none' only with "
                             f"hide_budget_from_lm true (it says what of the hidden number the LM still reads), got "
                             f"{self.lm_budget_hint!r} (hide_budget_from_lm {self.hide_budget_from_lm})")
        if self.hide_budget_from_lm and not self.read_budget_value:
            raise ValueError("hide_budget_from_lm hides the budget's number from the LM, so the budget needs another "
                             "path to π: set read_budget_value true as well")
        if self.prompt_read not in PROMPT_READS:
            raise ValueError(f"prompt_read must be one of {list(PROMPT_READS)}, got {self.prompt_read!r}")
        if self.track_call_rule and self.call_rule_episodes < len(self.budgets):
            raise ValueError(f"call_rule_episodes must be at least the number of budgets ({len(self.budgets)}) with "
                             f"track_call_rule, so that each budget is rolled out, got {self.call_rule_episodes}")
        if self.call_rule_greedy_passes < 0 or (self.call_rule_greedy_passes and not self.track_call_rule):
            raise ValueError(f"call_rule_greedy_passes re-fits the tracked call rule: a count >= 0, and above 0 only "
                             f"with track_call_rule true, got {self.call_rule_greedy_passes} (track_call_rule "
                             f"{self.track_call_rule})")
        if self.call_rule_greedy_episodes and not (self.call_rule_greedy_passes
                                                   and self.call_rule_greedy_episodes >= len(self.budgets)):
            raise ValueError(f"call_rule_greedy_episodes sizes the greedy passes of the tracked call rule: 0 (as many as "
                             f"call_rule_episodes), or at least the number of budgets ({len(self.budgets)}) with "
                             f"call_rule_greedy_passes above 0, got {self.call_rule_greedy_episodes} "
                             f"(call_rule_greedy_passes {self.call_rule_greedy_passes})")
        if self.call_rule_fixed_prompts and not self.track_call_rule:
            raise ValueError("call_rule_fixed_prompts fixes the prompts of the tracked call rule: set track_call_rule "
                             "true too, got call_rule_fixed_prompts true and track_call_rule false")
        if self.call_rule_corpora and not self.track_call_rule:
            raise ValueError(f"call_rule_corpora narrows the prompts of the tracked call rule: set track_call_rule "
                             f"true too, got call_rule_corpora {self.call_rule_corpora}")
        if not all(isinstance(c, str) and c for c in self.call_rule_corpora):
            raise ValueError(f"call_rule_corpora must be a list of corpus names (non-empty strings), got "
                             f"{self.call_rule_corpora!r}")
        if self.refine_call_rule and not self.track_call_rule:
            raise ValueError("refine_call_rule re-fits the tracked call rule: set track_call_rule true too "
                             "(without tracking, calibrate_calls calibrates from c = ½)")
        if not 0 <= self.calibration_tolerance < 1:
            raise ValueError(f"calibration_tolerance must lie in [0, 1), got {self.calibration_tolerance}")
        if not 0 <= self.policy_lr_decay_start <= 1 or not 0 <= self.policy_lr_final <= 1:
            raise ValueError(f"policy_lr_decay_start and policy_lr_final must lie in [0, 1], got "
                             f"{self.policy_lr_decay_start} and {self.policy_lr_final}")
        if self.settle_evaluations and not self.eval_every:
            raise ValueError("settle_evaluations stops phase 2 after evaluations: set eval_every > 0 too")

    def pid_gains(self) -> PIDGains:
        """The PID dual's gains (used when ``lagrange_rule`` is "pid")."""
        return PIDGains(kp=self.pid_kp, ki=self.pid_ki, kd=self.pid_kd, smoothing=self.pid_smoothing)


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class Setup:
    """What both phases read: the config, the task and its selection examples, the vector env, the run.

    Under data parallelism (:mod:`agents.distributed`) the vector env holds this rank's
    ``num_envs / N`` rows and the writer is TensorBoard's on rank 0 only.
    """

    config: TrainConfig
    run: Run
    task: Task
    envs: TeacherAssistedDecodingVectorEnv
    eval_examples: list[Example]
    writer: SummaryWriter | NullWriter
    device: torch.device = field(init=False)  # the run's
    dist: Distributed = field(init=False)  # the run's
    out: Path = field(init=False)  # the run's output folder
    train_examples: list[Example] = field(init=False)  # the task's
    call_rule_pool: np.ndarray = field(init=False)  # indices of the training rows track_call_rule draws from

    def __post_init__(self) -> None:
        assert self.run.out is not None  # start_run made it: TrainConfig.output_dir is a folder
        self.device, self.dist, self.out = self.run.device, self.run.dist, self.run.out
        self.train_examples = self.task.examples
        self.call_rule_pool = call_rule_pool(self.train_examples, self.config.call_rule_corpora)


def call_rule_pool(examples: Sequence[Example], corpora: Sequence[str]) -> np.ndarray:
    """The indices of the training rows whose corpus is one of ``corpora`` (every row where it is empty)."""
    if not corpora:
        return np.arange(len(examples))
    wanted = set(corpora)
    pool = np.array([i for i, e in enumerate(examples) if e.corpus in wanted], dtype=np.int64)
    if len(pool) == 0:
        found = sorted({e.corpus for e in examples})
        raise ValueError(f"call_rule_corpora {sorted(wanted)} match no training row: expected names from the "
                         f"data's 'corpus' field, which holds {found if found != [''] else 'nothing (no such field)'}")
    return pool


def make_setup(config: TrainConfig) -> Setup:
    check_selection_data(config.env_kwargs, config.eval_split, config.eval_env_kwargs,
                         config.allow_selection_on_training_data)
    run = start_run(config, config.output_dir, data_parallel=True)
    world = run.dist.world_size
    rows = rows_per_rank(config.num_envs, world, "num_envs")
    rows_per_rank(config.bc_batch_size, world, "bc_batch_size")
    tasks = load_tasks(config.env_id, {"reward_clip": config.reward_clip, **config.env_kwargs}, config.eval_split,
                       config.eval_env_kwargs, run.device, budgets=config.budgets, max_new_tokens=config.max_new_tokens)
    envs = TeacherAssistedDecodingVectorEnv(rows, tasks.train, **tasks.env_options)
    return Setup(
        config, run, tasks.train, envs, seeded_subset(tasks.selection.examples, config.eval_examples, config.seed),
        summary_writer(str(Path(config.output_dir) / "tensorboard"), run.dist),
    )


def run(config: TrainConfig) -> dict:
    """Run the phases the config asks for; returns a summary (also written to OUTPUT_DIR/summary.json)."""
    setup = make_setup(config)
    summary: dict = {}
    if config.phase in ("bc", "both"):
        summary["phase1"] = train_phase1(setup)
    if config.phase in ("pcl", "both"):
        summary["phase2"] = train_phase2(setup)
        if config.track_call_rule:
            summary["call_rule"] = tracked_call_rule_report(summary["phase2"])
            if config.refine_call_rule and "skipped" not in summary["call_rule"]:
                tracked = {e["budget"]: e["threshold"] for e in summary["call_rule"]["budgets"]}
                summary["call_rule"]["refined"] = ship_call_rule(setup, start_thresholds=tracked)
        elif config.calibrate_calls:
            summary["call_rule"] = ship_call_rule(setup)
    setup.run.write_summary(summary)
    setup.writer.close()
    if setup.dist.is_main:
        print(end_of_training(setup, summary))
    return summary


def ship_call_rule(setup: Setup, start_thresholds: dict[float, float] | None = None) -> dict:
    """Calibrate the selected policy's call threshold per budget on the selection rows and write it
    into ``best/`` (``call_rule.json``), the rule that `tw eval` and the decoders then use by default.

    Why: the dual drives the sampled rollouts' teacher use towards b, but the greedy rule a user
    decodes with (π(<τ>) > ½) still lands off b on some budgets (docs/budget-control.md). The
    threshold keeps the policy's own ranking of which tokens to ask for and moves only how many.
    Selection rows only, as for selection itself; the raw rule's figures are reported beside.
    ``start_thresholds`` (``refine_call_rule``): each budget's search starts from the tracked threshold
    and keeps it where it already lands within ``calibration_tolerance``. Why a tracked rule may need
    this: on de→en the training-prompt quantile misses the selection rows' teacher use by a shift
    common to all budgets that changes from one evaluation to the next (docs/budget-control.md).
    """
    config, dist = setup.config, setup.dist
    report: dict = {}
    best_dir = setup.out / "best"
    if not best_dir.exists():  # phase 2 evaluated nothing (pcl_batches 0 and eval_every 0)
        return {"skipped": "no best/ policy to calibrate"}
    if dist.is_main:
        report = ship_calibrated_call_rule(StudentPolicy.load(best_dir, device=setup.device), best_dir, setup.task,
                                           setup.eval_examples, config.budgets, setup.task.max_new_tokens,
                                           config.eval_split, tolerance=config.calibration_tolerance,
                                           start_thresholds=start_thresholds)
    barrier(dist)
    return report


def end_of_training(setup: Setup, summary: dict) -> str:
    """What `tw train` prints as it ends: per budget, the selected policy's teacher fraction and quality on
    the selection examples and the last λ; then where the files are (the whole summary: summary.json)."""
    config, out = setup.config, setup.out
    title = "tw train: " + "; ".join(
        f"phase {n}, {s['batches']} {what} batches in {s['seconds_this_run']:.0f} s"
        for n, what, s in ((1, "BC", summary.get("phase1")), (2, "PCL", summary.get("phase2"))) if s)
    phase1 = Path(config.init) if config.init and "phase1" not in summary else out / "phase1"  # --init: phase 1 is elsewhere
    files: dict[str, Path] = {"output": out, "phase-1 policy": phase1}
    table: list[list[str]] = []
    if "phase2" in summary:
        best, lambdas = summary["phase2"]["selection"]["best"], summary["phase2"]["lambdas"]
        title += " (stopped once settled: summary.json says why)" if "settled" in summary["phase2"]["selection"] else ""
        rule = "every budget within" if best and best["meets_budgets"] else "no evaluation met every budget within"
        title += (f"\nselected policy: PCL batch {best['step']} ({rule} δ {config.delta:g}), on "
                  f"{len(setup.eval_examples)} {config.eval_split} examples" if best else "\nno policy was evaluated")
        call_rule = summary.get("call_rule", {})
        tracked = "tracked" in call_rule  # evaluated with its own rule already: a second set only if refined
        shipped = {e["budget"]: e for e in (call_rule.get("refined", {}) if tracked else call_rule).get("budgets", [])}
        rule_thresholds = {float(b): c for b, c in (best or {}).get("call_rule", {}).get("thresholds", [])}
        table.append(["budget", f"teacher fraction ({'tracked c' if tracked else 'π>½'})", f"quality ({setup.task.metric})",
                      "λ (last)"] + (["tracked c"] if tracked else []) + (["shipped c", "its fraction", "its quality"] if shipped else []))
        for r in best["results"] if best else [{"budget": b} for b in lambdas]:
            cells = [format(r[k], f) if k in r else "-" for k, f in (("teacher_fraction", ".3f"), ("quality", ".2f"))]
            row = [f"{r['budget']:g}", *cells, f"{multiplier_for(lambdas, r['budget']):+.3f}"]
            if tracked:
                row.append(f"{rule_thresholds.get(float(r['budget']), 0.5):.3g}")
            if shipped:
                e = shipped.get(float(r["budget"]))
                row += [f"{e['threshold']:.3g}", f"{e['teacher_fraction']:.3f}", f"{e['quality']:.2f}"] if e else ["-"] * 3
            table.append(row)
        files |= ({"best policy": out / "best"} if best else {}) | {"final policy": out / "final"}
    return end_report(title, table, files | {"summary": out / "summary.json", "TensorBoard": out / "tensorboard"})


# ---------------------------------------------------------------------------------------------- phase 1
def round_up_draws(
    config: TrainConfig, rng: np.random.Generator, rows: int, device: torch.device
) -> torch.Tensor | None:
    """Uniform draws for the oracle's stochastic rounding, or None for the paper's floor."""
    if config.oracle_rounding == "floor":
        return None
    return torch.as_tensor(rng.random(rows), device=device)


def train_phase1(setup: Setup) -> dict:
    """Behaviour cloning of the oracle: −log π(<τ>) at the top ⌊l·b⌋ KL positions, KL elsewhere.

    On N processes each rank clones on its ``bc_batch_size / N`` prompts and DDP averages the
    gradients of the loss rescaled to the global token mean (:func:`data_parallel_loss_scale`).
    """
    config, run_dir, dist = setup.config, setup.out / "phase1-checkpoints", setup.dist
    final_dir = setup.out / "phase1"
    if (final_dir / "done.json").exists():
        return json.loads((final_dir / "done.json").read_text())
    clone = Phase1State.start(setup, run_dir)
    t0 = time.time()
    progress = tqdm(range(clone.step, config.bc_batches), desc="phase 1 (BC)", initial=clone.step,
                    total=config.bc_batches, disable=not dist.is_main)
    for step in progress:
        loss = phase1_step(setup, clone)
        if config.check_replicas:
            check_replicas(dist, list(clone.policy.parameters()), what=f"policy after phase-1 batch {step + 1}")
        setup.writer.add_scalar("phase1/loss", loss.item(), step)
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.bc_batches:
            clone.checkpoint(run_dir, step + 1, config.keep_checkpoints)
    summary = {"batches": config.bc_batches, "seconds_this_run": time.time() - t0, "processes": dist.world_size}

    def build(folder: Path) -> None:
        clone.policy.save(folder)
        write_json(folder / "done.json", summary)

    if dist.is_main:
        publish_dir(final_dir, build)
    barrier(dist)  # phase 2 on every rank reads the published policy
    return summary


@dataclass
class Phase1State:
    """What phase 1 carries from one batch to the next and resumes from a checkpoint: the policy, its
    optimiser, the rank's data RNG and the batches done. ``trained`` is what the training forward calls
    (the DDP wrapper, or the policy itself for one process)."""

    policy: StudentPolicy
    optimizer: Optimizer
    rng: np.random.Generator  # budgets and examples of each batch, the oracle's rounding
    dist: Distributed = SINGLE
    step: int = 0
    trained: torch.nn.Module = field(init=False)

    @classmethod
    def start(cls, setup: Setup, run_dir: Path) -> Phase1State:
        """The student (a fresh β/<τ> head around an LM) or, when ``run_dir`` holds a checkpoint, its state."""
        config, dist = setup.config, setup.dist
        source = student_source(config.student, setup.task)
        if isinstance(source, PreTrainedModel):  # a task's loaded student: a fresh β/<τ> head around it
            policy = StudentPolicy(load_lm(source, role="student", device=setup.device))
            policy = policy.to(policy.model.device)
        else:
            policy = StudentPolicy.load(source, device=setup.device)
        policy.eval()  # dropout off (§5.2); gradients still flow
        set_prompt_read(policy, config.prompt_read)
        if config.read_budget_value:
            policy.read_budget_value(setup.task.tokenizer)
        if config.hide_budget_from_lm:
            policy.hide_budget(config.lm_budget_hint)
        state = cls(policy, phase1_optimizer(config, policy), np.random.default_rng(rank_seed(config.seed, dist.rank)),
                    dist)
        torch.manual_seed(rank_seed(config.seed, dist.rank))
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None:
            state.resume(latest, config, setup.device)
        state.trained = wrap(state.policy, dist)  # the training forward: gradients averaged over ranks
        return state

    def resume(self, latest: Path, config: TrainConfig, device: torch.device) -> None:
        self.policy = StudentPolicy.load(latest / "policy", device=device).eval()
        self.optimizer = phase1_optimizer(config, self.policy)
        ckpt.load_optimizer(latest / "optimizer.pt", self.optimizer)
        state = ckpt.load_json(latest / "state.json")
        ckpt.restore_rng_state(rank_part(state, "rng", self.dist, latest), self.rng)
        self.step = state["step"]

    def checkpoint(self, run_dir: Path, step: int, keep: int) -> None:
        """A resumable checkpoint after ``step`` batches (written by rank 0; every rank waits for it)."""
        rank_rngs = all_gather_objects(ckpt.rng_state(self.rng), self.dist)

        def write(folder: Path) -> None:
            self.policy.save(folder / "policy")
            ckpt.save_optimizer(folder / "optimizer.pt", self.optimizer)
            ckpt.save_json(folder / "state.json", {"step": step, "rng": rank_rngs[0],
                                                   "world_size": self.dist.world_size, "rank_rng": rank_rngs})
        if self.dist.is_main:
            ckpt.write_checkpoint(run_dir, step, write, keep=keep)
        barrier(self.dist)


PROMPT_READS = ("mean", "attention")


def set_prompt_read(policy: StudentPolicy, prompt_read: str) -> None:
    """Give ``policy`` the prompt read a config asks for. "attention" on a mean-reading policy adds a zero
    query, which reads the mean at first; a policy that already reads by attention keeps its query
    (a config of "mean" does not take it away: the checkpoint says how it reads)."""
    if prompt_read == "attention":
        policy.read_prompt_by_attention()


def phase1_optimizer(config: TrainConfig, policy: StudentPolicy) -> Optimizer:
    return torch.optim.AdamW(policy.parameters(), lr=config.bc_lr, weight_decay=config.bc_weight_decay)


def phase1_step(setup: Setup, clone: Phase1State) -> torch.Tensor:
    """One behaviour-cloning batch: oracle episodes for random prompts and budgets, then one update; the loss."""
    config, dist, device, task = setup.config, setup.dist, setup.device, setup.task
    rng, policy = clone.rng, clone.policy
    rows = rows_per_rank(config.bc_batch_size, dist.world_size, "bc_batch_size")
    index = draw_examples(rng, len(setup.train_examples), rows, dist)
    budgets = draw_budgets(config, rng, rows)
    sources = [setup.train_examples[i].source for i in index]
    ids, mask = task.prompts(sources, budgets.tolist(), device)
    oracle = oracle_batch(
        task.teacher, policy, ids, mask, torch.as_tensor(budgets, device=device),
        task.max_new_tokens, task.eos_token_id, round_up_draws(config, rng, rows, device),
        task.teacher_prompts(sources, budgets.tolist(), device),
    )
    traj = oracle.trajectories
    # The head runs at the valid positions only (positions=), which phase1_loss reads as one row of N.
    valid = traj.mask
    logits = clone.trained(ids, mask, traj.state_ids, valid.long(), positions=valid)[None]
    everything = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    # The oracle's teacher log-probs at the valid positions stand in for its logits there (only their shape is
    # read when the distribution is given), so the teacher's [B, T, V] logits are not gathered again.
    teacher = oracle.teacher_distribution
    loss = phase1_loss(logits, teacher.log_probs[None], traj.is_call[valid][None], everything, teacher_log_probs=teacher)
    tokens = float(traj.mask.sum())
    scale = data_parallel_loss_scale(tokens, all_sum(tokens, dist), dist.world_size)
    clone.optimizer.zero_grad(set_to_none=True)
    (loss * scale).backward()  # scale is 1 for one process (exact: the run is unchanged)
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
    clone.optimizer.step()
    return loss


# ---------------------------------------------------------------------------------------------- phase 2
def draw_budgets(config: TrainConfig, rng: np.random.Generator, rows: int) -> np.ndarray:
    """Each row's budget: one of ``budgets`` (phase 1's draw), or uniform on the grid of ``budget_step`` in
    ``budget_range`` (to 0.001) less ``budget_holdout``."""
    if config.budget_range is None:
        return rng.choice(np.array(config.budgets, dtype=np.float64), size=rows)
    held_out = {round(float(b), 3) for b in config.budget_holdout}
    grid = np.array([b for b in budget_grid(config) if b not in held_out], dtype=np.float64)
    return grid[rng.integers(0, len(grid), size=rows)]


def budget_grid(config: TrainConfig) -> list[float]:
    """The budgets ``budget_range`` draws from: lo, lo + ``budget_step``, ..., hi (to 0.001)."""
    assert config.budget_range is not None
    lo, hi = (float(x) for x in config.budget_range)
    steps = int(round((hi - lo) / config.budget_step))
    return [min(round(lo + config.budget_step * k, 3), hi) for k in range(steps + 1)]


def episode_rewards(
    batch: Trajectories, lambdas: dict[float, float], mu: float, sigma: float, clip: float = 2.0
) -> torch.Tensor:
    """Eq. 17 rewards of a batch, recomputed from its raw parts with the current λ and normalisers."""
    lam = np.array([multiplier_for(lambdas, b) for b in batch.budget.tolist()])[:, None]
    rewards = eq17_reward(
        batch.teacher_logprob.cpu().numpy(), batch.is_call.cpu().numpy(), batch.budget.cpu().numpy()[:, None],
        lam, mu, sigma, clip=clip,
    )
    return torch.as_tensor(rewards, dtype=torch.float32, device=batch.mask.device) * batch.mask


def multiplier_for(lambdas: dict[float, float], budget: float) -> float:
    """λ of a budget: the dual's own (budgets travel as float32), else interpolated between the two around it
    (a budget drawn from ``budget_range`` with numeric prompts), as the env does."""
    nearest = min(lambdas, key=lambda b: abs(b - budget))
    return lambdas[nearest] if abs(nearest - budget) < 1e-6 else interpolate_multiplier(budget, lambdas)


def pcl_update(
    policy: StudentPolicy | torch.nn.Module, value: ValueNetwork | torch.nn.Module, batch: Trajectories, rewards: torch.Tensor, config: TrainConfig,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer], loss_scale: float = 1.0,
) -> float:
    """One gradient step of both networks on the soft path-consistency loss; returns the loss.

    ``policy`` and ``value`` may be their ``DistributedDataParallel`` wrappers; ``loss_scale``
    (:func:`~agents.distributed.data_parallel_loss_scale`) then makes the averaged gradient that
    of the loss over every rank's episodes.
    """
    mask = batch.mask
    # π's head at the valid positions only (positions=); padding's log π is 0 (pcl_loss masks it anyway).
    logits = policy(batch.prompt_ids, batch.prompt_mask, batch.state_ids, mask.long(), positions=mask).float()
    taken = torch.log_softmax(logits, dim=-1).gather(-1, batch.actions[mask][:, None]).squeeze(-1)
    log_pi = torch.zeros(mask.shape, dtype=taken.dtype, device=mask.device).masked_scatter(mask, taken)
    values = value(batch.prompt_ids, batch.prompt_mask, batch.state_ids, mask.long()).float()  # [B, T+1]
    # max_new_tokens is the decoding horizon at training and at test time, so nothing is earned after
    # it: a truncated episode ends with value 0, like a terminated one. `bootstrap_truncated` takes
    # V(s_L) instead, for a horizon shorter than the decoding one.
    bootstrap = None
    if config.bootstrap_truncated:
        lengths = mask.sum(dim=1)
        after_last = values.gather(1, lengths[:, None]).squeeze(1)
        bootstrap = torch.where(batch.truncated, after_last, torch.zeros_like(after_last))
    loss = pcl_loss(log_pi, values[:, :-1], rewards, mask, config.tau, config.gamma, config.horizon, bootstrap)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    (loss * loss_scale).backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
        torch.nn.utils.clip_grad_norm_(value.parameters(), config.grad_clip)
    for optimizer in optimizers:
        optimizer.step()
    return float(loss.item())


def optimizers_for(config: TrainConfig, policy: StudentPolicy, value: ValueNetwork) -> tuple[Optimizer, Optimizer]:
    return (
        torch.optim.AdamW(policy.parameters(), lr=config.policy_lr, weight_decay=config.policy_weight_decay),
        torch.optim.AdamW(value.parameters(), lr=config.value_lr, weight_decay=config.value_weight_decay),
    )


@dataclass
class PCLState:
    """Everything phase 2 carries from one batch to the next, saved and restored as one.

    With the env's reward normalisers and RNG (which the env owns), this is the whole state: a run
    resumed from a checkpoint continues bit-identically.

    Under data parallelism every rank holds one: the models, optimisers, dual and selection are
    identical on every rank; the replay buffer and the random streams are the rank's own.
    ``trained_policy``/``trained_value`` are what the training forwards call (the DDP wrappers,
    or the models themselves for one process).
    """

    policy: StudentPolicy
    value: ValueNetwork
    optimizers: tuple[Optimizer, Optimizer]
    dual: BudgetDual
    replay: ReplayBuffer
    rng: np.random.Generator  # budgets and examples of each batch, the oracle's rounding
    generator: torch.Generator  # rollout sampling and replay draws
    selection: dict = field(default_factory=lambda: {"best": None, "evaluations": []})
    step: int = 0
    dist: Distributed = SINGLE
    trained_policy: torch.nn.Module = field(init=False)
    trained_value: torch.nn.Module = field(init=False)

    def __post_init__(self) -> None:
        # DDP broadcasts rank 0's weights when it wraps, so every rank starts from the same ones.
        self.trained_policy = wrap(self.policy, self.dist)
        self.trained_value = wrap(self.value, self.dist, find_unused_parameters=True)  # its LM head is unused

    @classmethod
    def start(cls, config: TrainConfig, policy_dir: Path, device: torch.device,
              envs: TeacherAssistedDecodingVectorEnv, dist: Distributed = SINGLE) -> PCLState:
        """A fresh state from a policy folder; every random stream comes from the run's seed (and rank)."""
        seed = rank_seed(config.seed, dist.rank)
        torch.manual_seed(config.seed + 1)  # the value head's initialisation: the same on every rank
        policy = StudentPolicy.load(policy_dir, device=device).eval()
        set_prompt_read(policy, config.prompt_read)
        if config.read_budget_value and policy.budget_tokenizer is None:  # a policy that does not read it yet
            policy.read_budget_value(envs.task.tokenizer)
        if config.hide_budget_from_lm and (not policy.hide_budget_from_lm or policy.lm_budget_hint != config.lm_budget_hint):
            policy.hide_budget(config.lm_budget_hint)
        value = ValueNetwork.from_policy(policy).eval()
        envs.np_random = np.random.default_rng(seed + 2)  # the env's own draws (teacher sampling)
        dual = make_dual(config.budgets, config.lagrange_rule, lr=config.lagrange_lr, cap=config.lagrange_cap,
                         floor=config.lagrange_floor, window=config.lagrange_window, gains=config.pid_gains())
        return cls(policy, value, optimizers_for(config, policy, value), dual, ReplayBuffer(config.replay_capacity),
                   np.random.default_rng(seed + 1), torch.Generator().manual_seed(seed + 1), dist=dist)

    @classmethod
    def resume(cls, folder: Path, config: TrainConfig, device: torch.device,
               envs: TeacherAssistedDecodingVectorEnv, dist: Distributed = SINGLE) -> PCLState:
        """The state saved by :meth:`save` in ``folder``: models, optimisers, λ, replay, normalisers, RNGs, step.

        Rank r > 0 of a data-parallel run reads its own replay and random states from ``rank-r/``;
        a checkpoint resumes only with the world size that wrote it (:func:`check_world_size`).
        """
        check_world_size(ckpt.load_json(folder / "state.json"), dist, folder)  # before anything loads
        state = cls.start(config, folder / "policy", device, envs, dist)
        load_model(state.value, str(folder / "value.safetensors"), device=str(device))
        ckpt.load_optimizer(folder / "policy_optimizer.pt", state.optimizers[0])
        ckpt.load_optimizer(folder / "value_optimizer.pt", state.optimizers[1])
        own = folder if dist.rank == 0 else folder / f"rank-{dist.rank}"
        state.replay.load(own / "replay.safetensors")
        state.load_state_dict(ckpt.load_json(own / "state.json"), envs)  # last: it restores the RNGs
        return state

    def save(self, folder: Path, envs: TeacherAssistedDecodingVectorEnv,
             other_ranks: list[tuple[dict[str, Any], ReplayBuffer]] | None = None) -> None:
        """Write the checkpoint (rank 0); ``other_ranks`` are ranks 1.. N−1's :meth:`rank_state`."""
        self.policy.save(folder / "policy")
        save_model(self.value, str(folder / "value.safetensors"))
        ckpt.save_optimizer(folder / "policy_optimizer.pt", self.optimizers[0])
        ckpt.save_optimizer(folder / "value_optimizer.pt", self.optimizers[1])
        self.replay.save(folder / "replay.safetensors")
        ckpt.save_json(folder / "state.json", self.state_dict(envs))
        for rank, (state, replay) in enumerate(other_ranks or [], start=1):
            (folder / f"rank-{rank}").mkdir()
            replay.save(folder / f"rank-{rank}" / "replay.safetensors")
            ckpt.save_json(folder / f"rank-{rank}" / "state.json", state)

    def rank_state(self, envs: TeacherAssistedDecodingVectorEnv) -> tuple[dict[str, Any], ReplayBuffer]:
        """What only this rank knows, for rank 0 to write: the JSON state and the replay buffer."""
        return self.state_dict(envs), self.replay

    def state_dict(self, envs: TeacherAssistedDecodingVectorEnv) -> dict[str, Any]:
        """The JSON part of a checkpoint (tensors go to safetensors files beside it)."""
        return {
            "step": self.step, "dual": self.dual.state_dict(), "selection": self.selection,
            "reward_stats": envs.reward_stats.state_dict(), "env_rng": envs.np_random.bit_generator.state,
            "rng": ckpt.rng_state(self.rng), "generator": self.generator.get_state().tolist(),
            "world_size": self.dist.world_size,
        }

    def load_state_dict(self, state: dict[str, Any], envs: TeacherAssistedDecodingVectorEnv) -> None:
        self.step, self.selection = state["step"], state["selection"]
        self.dual.load_state_dict(state["dual"])
        envs.reward_stats.load_state_dict(state["reward_stats"])
        envs.np_random.bit_generator.state = state["env_rng"]
        ckpt.restore_rng_state(state["rng"], self.rng)
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


def policy_lr_factor(step: int, total: int, decay_start: float, final: float) -> float:
    """The policy lr of PCL batch ``step`` (0-based) as a multiple of ``policy_lr``: 1 until ``decay_start`` ·
    ``total`` batches, then falling linearly to ``final`` at the last batch. Why: the dual chases a plant that
    drifts while the policy learns (docs/budget-control.md); a slower policy late in phase 2 lets it settle.

    By hand: total 300, start ⅓ (batch 100), final 0.1: batches 0–100 → 1, batch 299 → 0.1, batch 199 →
    1 − 0.9·99/199 ≈ 0.552.
    """
    first = decay_start * total
    if step < first or total <= 1:
        return 1.0
    span = max(total - 1 - first, 1e-9)
    return 1.0 - (1.0 - final) * min((step - first) / span, 1.0)


def train_phase2(setup: Setup) -> dict:
    """PCL with the Lagrangian: the paper's phase 2, with checkpoint selection on validation.

    Each batch: rollout → oracle → updates → λ step → logging → selection → checkpoint.
    """
    config, envs, device, dist = setup.config, setup.envs, setup.device, setup.dist
    run_dir = setup.out / "phase2-checkpoints"
    init = phase1_policy_dir(config.init, setup.out, "phase 2")
    latest = ckpt.latest_checkpoint(run_dir)
    state = (PCLState.start(config, init, device, envs, dist) if latest is None
             else PCLState.resume(latest, config, device, envs, dist))
    t0 = time.time()
    if state.step == 0 and config.eval_every:  # the phase-1 policy is a candidate too
        state.selection = evaluate_and_select(setup, state, 0)
    progress = tqdm(range(state.step, config.pcl_batches), desc="phase 2 (PCL)", initial=state.step,
                    total=config.pcl_batches, disable=not dist.is_main)
    throughput = Throughput()
    for step in progress:
        batch_start = time.perf_counter()
        for group in state.optimizers[0].param_groups:  # from the step alone: a resumed run sets the same lr
            group["lr"] = config.policy_lr * policy_lr_factor(step, config.pcl_batches, config.policy_lr_decay_start,
                                                              config.policy_lr_final)
        on_policy, losses, used, (mu, sigma) = pcl_batch(setup, state)  # 1.–4.
        throughput.add(int(sum(tokens for _, tokens in used.values())), time.perf_counter() - batch_start)
        state.step = step + 1
        if config.check_replicas:
            check_replicas(dist, [*state.policy.parameters(), *state.value.parameters()], state.dual.lambdas,
                           envs.reward_stats.mu, envs.reward_stats.sigma, what=f"state after phase-2 batch {state.step}")
        # 5. Logging.
        log_phase2_batch(setup.writer, step, on_policy, losses, state.dual, mu, sigma, config.reward_clip)
        fractions = state.dual.fractions
        progress.set_postfix(loss=f"{np.mean(losses):.3f}", frac=" ".join(f"{f:.2f}" for _, f in sorted(fractions.items())))
        # 6. Checkpoint selection on validation (§3.3), then a resumable checkpoint; stop once settled.
        select_and_checkpoint(setup, state, run_dir)
        settled = settle_point(state.selection["evaluations"], config.settle_evaluations, config.settle_min_gain)
        if settled is not None and state.step < config.pcl_batches:
            state.selection = {**state.selection, "settled": settled}
            break
    if dist.is_main:
        publish_dir(setup.out / "final", state.policy.save)
    barrier(dist)
    stop = state.selection.get("settled") or {"step": state.step, "reason": "ran every batch (pcl_batches)"}
    return {"batches": state.step, "stop": stop, "seconds_this_run": time.time() - t0, "lambdas": state.dual.lambdas,
            "reward_normalisers": {"mu": envs.reward_stats.mu, "sigma": envs.reward_stats.sigma},
            "selection": state.selection, "processes": dist.world_size, **throughput.summary("on_policy")}


def pcl_batch(
    setup: Setup, state: PCLState
) -> tuple[Trajectories, list[float], dict[float, tuple[float, float]], tuple[float, float]]:
    """One PCL batch but its logging: 1. on-policy and 2. oracle episodes, 3. the updates on a mix of them
    and replayed episodes, 4. the Lagrangian step from the on-policy teacher use of every rank.

    Returns the on-policy episodes, the update losses, the {budget: (calls, tokens)} the dual stepped on,
    and the reward normalisers (μ_r, σ_r) the updates used. ``tw bench-train`` times exactly this."""
    on_policy, oracle = phase2_episodes(setup, state)
    mu, sigma = setup.envs.reward_stats.mu, setup.envs.reward_stats.sigma
    losses = pcl_updates(setup, state, on_policy, oracle, mu, sigma)
    used = all_sum_counts(on_policy.teacher_fraction_by_budget(), setup.dist)
    state.dual.record(used)
    state.dual.step()
    return on_policy, losses, used, (mu, sigma)


def phase2_episodes(setup: Setup, state: PCLState) -> tuple[Trajectories, Trajectories]:
    """One on-policy episode per prompt, budgets balanced over the batch (each rank: its rows, its
    examples), then one oracle (off-policy) episode per prompt."""
    config, envs, device, dist, task = setup.config, setup.envs, setup.device, setup.dist, setup.task
    rows = envs.num_envs  # this rank's rows: num_envs / N
    budgets = (state.rng.permutation(np.resize(np.array(config.budgets, dtype=np.float64), rows))
               if config.budget_range is None else draw_budgets(config, state.rng, rows))
    index = draw_examples(state.rng, len(setup.train_examples), rows, dist)
    envs.set_lagrange_multipliers(state.dual.lambdas)
    before = envs.reward_stats.mark()
    on_policy, _ = collect_on_policy(envs, state.policy, budgets.tolist(), index.tolist(), state.generator,
                                     config.rollout_temperature)
    merge_reward_stats(envs.reward_stats, before, dist)  # μ_r, σ_r from every rank's episodes
    oracle = oracle_batch(
        task.teacher, state.policy, on_policy.prompt_ids, on_policy.prompt_mask, on_policy.budget,
        task.max_new_tokens, task.eos_token_id, round_up_draws(config, state.rng, rows, device),
        task.teacher_prompts([setup.train_examples[i].source for i in index], budgets.tolist(), device),
    ).trajectories
    return on_policy, oracle


def pcl_updates(
    setup: Setup, state: PCLState, on_policy: Trajectories, oracle: Trajectories, mu: float, sigma: float
) -> list[float]:
    """``updates_per_batch`` PCL updates, each on the batch's episodes plus replayed ones; then both
    batches join the replay buffer. The losses."""
    config, dist = setup.config, setup.dist
    losses = []
    for _ in range(config.updates_per_batch):
        parts = [on_policy, oracle]
        replayed = state.replay.sample(config.replay_per_update, state.generator)
        if replayed is not None:
            parts.append(replayed.to(setup.device))
        batch = Trajectories.concat(parts)
        rewards = episode_rewards(batch, state.dual.lambdas, mu, sigma, config.reward_clip)
        scale = data_parallel_loss_scale(len(batch), all_sum(len(batch), dist), dist.world_size)
        losses.append(pcl_update(state.trained_policy, state.trained_value, batch, rewards, config,
                                 state.optimizers, scale))
    state.replay.add(on_policy)
    state.replay.add(oracle)
    return losses


def select_and_checkpoint(setup: Setup, state: PCLState, run_dir: Path) -> None:
    """After a batch: checkpoint selection on validation (§3.3) every ``eval_every`` batches and after the
    last, and a resumable checkpoint every ``checkpoint_every`` (but the last)."""
    config, envs, dist = setup.config, setup.envs, setup.dist
    done = state.step == config.pcl_batches
    if (config.eval_every and state.step % config.eval_every == 0) or done:
        state.selection = evaluate_and_select(setup, state, state.step)
    if state.step % config.checkpoint_every == 0 and not done:
        rank_states = all_gather_objects(state.rank_state(envs), dist)
        if dist.is_main:
            ckpt.write_checkpoint(run_dir, state.step, partial(state.save, envs=envs, other_ranks=rank_states[1:]),
                                  keep=config.keep_checkpoints)
        barrier(dist)


def log_phase2_batch(
    writer: SummaryWriter | NullWriter, step: int, on_policy: Trajectories, losses: list[float], dual: BudgetDual,
    mu: float, sigma: float, reward_clip: float,
) -> None:
    """TensorBoard scalars of one PCL batch: loss, reward, normalisers, teacher use and λ per budget."""
    writer.add_scalar("pcl/loss", float(np.mean(losses)), step)
    on_rewards = episode_rewards(on_policy, dual.lambdas, mu, sigma, reward_clip)
    writer.add_scalar("pcl/reward_per_token", float(on_rewards.sum() / on_policy.mask.sum()), step)
    writer.add_scalar("pcl/reward_mu", mu, step)
    writer.add_scalar("pcl/reward_sigma", sigma, step)
    student_tokens = on_policy.mask & ~on_policy.is_call
    writer.add_scalar("pcl/student_token_teacher_logprob",
                      float(on_policy.teacher_logprob[student_tokens].mean()) if student_tokens.any() else 0.0, step)
    for b, f in dual.fractions.items():
        writer.add_scalar(f"teacher_fraction/b={budget_label(b)}", f, step)
        writer.add_scalar(f"lambda/b={budget_label(b)}", dual.lambdas[dual.key(b)], step)


def evaluate_and_select(setup: Setup, state: PCLState, step: int) -> dict:
    """Evaluate the policy on the selection rows at every budget and keep it if it is the best so far;
    with ``track_call_rule``, first set its call rule from training-prompt rollouts (:func:`track_call_rule`):
    it is evaluated, selected and saved with that rule."""
    rule = track_call_rule(setup, state, step) if setup.config.track_call_rule else None
    results = evaluate_budgets(state.policy, setup.task, setup.eval_examples, setup.config.budgets,
                               setup.task.max_new_tokens, dist=setup.dist)
    return select_checkpoint(setup, state.policy, results, step, state.selection,
                             {"call_rule": rule} if rule is not None else None)


def call_rule_rng(config: TrainConfig, step: int, rank: int) -> np.random.Generator:
    """The stream that draws the tracked call rule's prompts and sampling seeds at PCL batch ``step``.

    Fresh prompts at every evaluation (the default), or with ``call_rule_fixed_prompts`` the same ones
    at every evaluation. Why fixed: a tracked threshold is a quantile over a few thousand states, and on
    de→en which prompts were drawn moved the evaluated teacher use by about 0.01 from one evaluation
    to the next (docs/budget-control.md); with the same prompts that part of the noise is common to
    every evaluation, and the thresholds move only as the policy does.
    """
    return np.random.default_rng([config.seed, 3, rank] if config.call_rule_fixed_prompts
                                 else [config.seed, step, 3, rank])


def track_call_rule(setup: Setup, state: PCLState, step: int) -> dict:
    """Set the policy's call rule to the one it would keep its budgets with now: per budget, the
    threshold c of "call iff π(<τ>) > c" that calls at a fraction b of the decoding states of fresh
    rollouts on training prompts (:func:`~agents.evaluation.quantile_call_thresholds`); the prompts are
    drawn afresh at every evaluation, or the same ones each time (``call_rule_fixed_prompts``,
    :func:`call_rule_rng`).

    Why: the dual steers the policy's π(<τ>) but cannot hold it still between batches; where π(<τ>)
    crowds round ½ a fixed c = ½ turns each small drift into a large swing of teacher use
    (docs/budget-control.md). The threshold is part of the controller: it reads training prompts
    only, never the selection rows it is then judged on. The rollouts (``call_rule_episodes``, budgets
    balanced, ``rollout_temperature``) draw from their own seeded streams, and the env's reward
    normalisers and RNG are put back, so training itself goes on exactly as without them.
    """
    config, envs, dist, policy = setup.config, setup.envs, setup.dist, state.policy
    started = time.time()
    rows = envs.num_envs
    batches = -(-config.call_rule_episodes // (rows * dist.world_size))
    greedy_batches = -(-(config.call_rule_greedy_episodes or config.call_rule_episodes) // (rows * dist.world_size))
    rng = call_rule_rng(config, step, dist.rank)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    budgets = [float(b) for b in config.budgets]

    def call_probabilities(thresholds: dict[float, float] | None) -> dict[float, torch.Tensor]:
        """π(<τ>) at every decoding state of fresh rollouts on training prompts, pooled over ranks, per
        budget: ``call_rule_episodes`` sampled at the rollout temperature (``thresholds`` None) or
        ``call_rule_greedy_episodes`` greedy under ``thresholds``, as the shipped decoder acts."""
        calls: dict[float, list[torch.Tensor]] = {b: [] for b in budgets}
        with torch.no_grad():
            for batch in range(batches if thresholds is None else greedy_batches):
                # Budgets in turn over every rank's rows and batch after batch, so that each budget gets its
                # share whatever the rows per rank (a rank of 3 rows alone would never roll out b = 0.3 … 0.5).
                first = (batch * dist.world_size + dist.rank) * rows
                row_budgets = [budgets[(first + j) % len(budgets)] for j in range(rows)]
                pool = setup.call_rule_pool  # every training row unless call_rule_corpora narrows it
                index = pool[draw_examples(rng, len(pool), rows, dist)]
                greedy = None if thresholds is None else [thresholds[b] for b in row_budgets]
                episodes, _ = collect_on_policy(envs, policy, row_budgets, index.tolist(), generator,
                                                config.rollout_temperature, call_thresholds=greedy)
                logits = policy(episodes.prompt_ids, episodes.prompt_mask, episodes.state_ids, episodes.mask.long(),
                                positions=episodes.mask)
                probability = call_log_probability(logits).exp().cpu()
                state_budget = episodes.budget[episodes.mask.nonzero()[:, 0]].double().cpu()
                for b in budgets:
                    calls[b].append(probability[torch.isclose(state_budget, torch.tensor(b, dtype=torch.float64),
                                                              atol=1e-6)])
        gathered = all_gather_objects({b: torch.cat(v).numpy() for b, v in calls.items()}, dist)
        return {b: torch.as_tensor(np.concatenate([part[b] for part in gathered])) for b in budgets}

    saved_stats, saved_rng = envs.reward_stats.state_dict(), envs.np_random.bit_generator.state
    passes = []
    try:
        pooled = call_probabilities(None)
        thresholds = quantile_call_thresholds(pooled)
        for _ in range(config.call_rule_greedy_passes):
            # Why: the sampled rollouts visit the states of π's own calls, the shipped decoder those of its
            # thresholds; where the two call at different rates the states differ, and so does the quantile
            # (on de→en the evaluated misses shared one sign per evaluation). A greedy pass under the
            # thresholds reads the states the shipped rule visits: a fixed-point step c ← quantile(states(c)).
            pooled = call_probabilities(thresholds)
            # The greedy decode's teacher use on these training prompts at the thresholds it started from.
            passes.append({"start": [[b, c] for b, c in sorted(thresholds.items())],
                           "fraction_at_start": {str(b): float((v > thresholds[b]).double().mean())
                                                 for b, v in pooled.items()}})
            thresholds = quantile_call_thresholds(pooled)
    finally:
        envs.reward_stats.load_state_dict(saved_stats)
        envs.np_random.bit_generator.state = saved_rng
    if config.check_replicas and dist.world_size > 1:
        differing = [r for r, other in enumerate(all_gather_objects(thresholds, dist)) if other != thresholds]
        if differing:
            raise RuntimeError(f"rank {dist.rank}'s tracked call thresholds {thresholds} differ from ranks {differing}' "
                               f"after PCL batch {step}: expected every rank to pool the same states")
    policy.call_thresholds = thresholds
    report = {"thresholds": [[b, c] for b, c in sorted(thresholds.items())], "episodes": batches * rows * dist.world_size,
              "greedy_episodes": greedy_batches * rows * dist.world_size if passes else 0,
              "states": {str(b): len(v) for b, v in pooled.items()},
              "raw_rule_fraction": {str(b): float((v > 0.5).double().mean()) for b, v in pooled.items()},
              "seconds": time.time() - started}
    if passes:
        report["greedy_passes"] = passes
    return report


def tracked_call_rule_report(phase2: dict) -> dict:
    """``summary.json``'s ``call_rule`` under ``track_call_rule``: the selected policy's rule, set at its
    evaluation from training-prompt rollouts (no calibration on the selection rows after training)."""
    best = phase2["selection"]["best"]
    if best is None or "call_rule" not in best:
        return {"skipped": "no evaluated policy carries a tracked call rule"}
    thresholds = dict((float(b), float(c)) for b, c in best["call_rule"]["thresholds"])
    return {"tracked": f"set at PCL batch {best['step']} from π(<τ>) on {best['call_rule']['episodes']} "
                       "training-prompt rollouts", "policy": "best/",
            "budgets": [{"budget": r["budget"], "threshold": thresholds.get(float(r["budget"]), 0.5),
                         "teacher_fraction": r["teacher_fraction"], "quality": r["quality"]} for r in best["results"]]}


def select_checkpoint(setup: Setup, policy: StudentPolicy, results: list[BudgetResult], step: int, selection: dict,
                      extra: dict | None = None) -> dict:
    """Keep the policy that meets every budget within δ with the best mean quality (§3.3).

    "Meets" follows the Lagrangian's semantics (:func:`~agents.evaluation.budget_violation`): with
    ``lagrange_floor`` ≥ 0 a budget is a ceiling (f ≤ b + δ), below 0 a target (|f − b| ≤ δ).

    Until some evaluation meets every budget, the one with the smallest worst violation is kept,
    so a run always leaves a usable ``best`` policy; ``summary.json`` says which rule chose it.
    """
    config = setup.config
    ceiling = budgets_are_ceilings(config.lagrange_floor)
    record = {"step": step, **selection_record(results, config.delta, ceiling), **(extra or {})}
    for r in results:
        setup.writer.add_scalar(f"eval/teacher_fraction/b={budget_label(r.budget)}", r.teacher_fraction, step)
        setup.writer.add_scalar(f"eval/quality/b={budget_label(r.budget)}", r.quality, step)
    best = selection["best"]
    better = is_better_selection(record, best)
    selection = {"best": record if better else best, "evaluations": selection["evaluations"] + [record]}
    if better and setup.dist.is_main:
        def build(folder: Path) -> None:
            policy.save(folder)
            write_json(folder / "selection.json", record)

        publish_dir(setup.out / "best", build)
    if config.keep_evaluated_policies and setup.dist.is_main:
        # Why: PCL's quality swings between evaluations, and the rule above judges each policy at its own
        # call rule only; `tw eval` can calibrate every kept one and choose again (tw_policy_candidates).
        def build_evaluated(folder: Path) -> None:
            policy.save(folder)
            write_json(folder / "selection.json", record)

        publish_dir(evaluated_policy_dir(setup.out, step), build_evaluated)
    return selection


def evaluated_policy_dir(output_dir: Path, step: int) -> Path:
    """Where ``keep_evaluated_policies`` keeps the policy evaluated after PCL batch ``step`` (0: the phase-1 policy)."""
    return Path(output_dir) / "phase2-evaluated" / f"step-{step:06d}"
