"""The PPO ablation: phase 2 with Stable-Baselines3's PPO instead of PCL.

Same environment, same Eq. 17 reward (computed by the env), same per-budget Lagrangian (λ stepped
after every rollout from the trailing token-level teacher use), same starting point (the phase-1
policy) and the same final evaluation as ``tw train``; only the policy-gradient algorithm differs.
``tw train --algo ppo --config FILE`` (or ``tw train-ppo``) runs it.

Layout of OUTPUT_DIR: ``config.json``; ``tensorboard/ppo_1`` (SB3's logs plus ``lagrange/*``);
``ppo-checkpoints/step-NNNNNN`` (SB3's ``model.zip`` and ``state.json`` with λ, the λ window, the
reward normalisers and the timestep count, published atomically; ``latest`` points at the newest;
a rerun with the same OUTPUT_DIR resumes there); ``final`` (``StudentPolicy.save``) and
``summary.json``. Use an OUTPUT_DIR of its own (``final``/``summary.json`` are also the names the PCL
trainer writes) and point ``init`` at the PCL run's ``phase1``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import tw_env  # noqa: F401  (registers the tasks)
from agents import checkpoint as ckpt
from agents.evaluation import (
    budgets_are_ceilings,
    evaluate_budgets,
    mean_quality,
    meets_budgets,
    seeded_subset,
    ship_calibrated_call_rule,
    worst_violation,
)
from agents.lagrangian import LAGRANGE_RULES, PIDGains
from agents.policy import StudentPolicy
from agents.run import Tasks, end_report, load_tasks, phase1_policy_dir, start_run
from agents.sb3_adapter import (
    LagrangeCallback,
    LMActorCriticPolicy,
    PeriodicCallback,
    SB3VecEnvAdapter,
    WallTimeCallback,
)
from tw_env.atomic import publish_dir
from tw_env.prompts import BUDGETS
from tw_env.vector_env import TeacherAssistedDecodingVectorEnv

if TYPE_CHECKING:
    from stable_baselines3 import PPO
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.vec_env import VecEnv, VecMonitor

CHECKPOINTS = "ppo-checkpoints"


@dataclass
class PPOConfig:
    """The PPO ablation of phase 2 (Stable-Baselines3 PPO on the Eq. 17 reward with per-budget λ)."""

    env_id: str = "TrainingWheels-Synthetic-v0"  # a registered Training Wheels task
    env_kwargs: dict = field(default_factory=dict)  # overrides for gym.make: teacher, student, tokenizer, data, ...
    init: str | None = None  # phase-1 policy directory (default: OUTPUT_DIR/phase1)
    output_dir: str = "runs/tw-ppo"  # checkpoints, TensorBoard logs, the final policy and summary.json
    seed: int = 0  # seeds SB3 (torch, action sampling) and the env's draws
    device: str = "auto"  # "cpu", "cuda" or "auto"
    threads: int = 0  # torch CPU threads (0: torch's default)
    num_envs: int = 32  # rows of the vector env
    n_steps: int = 64  # env steps per row per rollout (a rollout is n_steps * num_envs timesteps)
    batch_size: int = 256  # PPO minibatch size (timesteps)
    n_epochs: int = 4  # PPO epochs over each rollout
    learning_rate: float = 1e-5  # policy learning rate (§5.2's phase-2 rate)
    weight_decay: float = 1e-5  # AdamW weight decay (§5.2)
    value_model: str = "head"  # "head": MLP on the student's detached decoder state; "network": a ValueNetwork copy
    value_hidden: list = field(default_factory=lambda: [256])  # hidden sizes of the value head
    value_lr: float | None = None  # value learning rate (default: 1e-4 for "head", 1e-6 for "network" as in §5.2)
    total_timesteps: int = 200_000  # env steps (tokens) to train on, summed over rows
    wall_time_seconds: float | None = None  # stop training after this many seconds of this run (None: no limit)
    ent_coef: float = 0.0  # entropy bonus
    clip_range: float = 0.2  # PPO ratio clip
    gamma: float = 1.0  # discount (episodes are short and the paper's return is undiscounted)
    gae_lambda: float = 0.95  # GAE λ
    vf_coef: float = 0.5  # value-loss weight
    max_grad_norm: float = 1.0  # gradient-norm clip
    target_kl: float | None = None  # early stop of an update's epochs at this KL (None: off)
    lagrange_lr: float = 1e-2  # η of λ_b ← clip(λ_b + η(f_b − b), 0, cap) (§5.2)
    lagrange_cap: float = 2.0  # upper bound of λ_b (§5.2)
    lagrange_floor: float = 0.0  # lower bound of λ_b: 0 makes b a ceiling (the paper), < 0 a target (f = b)
    lagrange_window: int = 4  # trailing rollouts whose teacher use drives λ
    lagrange_rule: str = "integral"  # "integral": the step above on the trailing window; "pid": a PID controller on the smoothed fraction (docs/budget-control.md)
    pid_kp: float = 0.5  # lagrange_rule "pid": proportional gain on the smoothed error f̄ − b
    pid_ki: float = 0.05  # lagrange_rule "pid": integral gain per rollout
    pid_kd: float = 0.0  # lagrange_rule "pid": derivative gain on the change of f̄ per rollout
    pid_smoothing: float = 0.3  # lagrange_rule "pid": weight of the newest rollout in f̄'s moving averages (1: none)
    checkpoint_every: int = 20_000  # timesteps between resumable checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # resumable checkpoints kept on disk
    max_new_tokens: int | None = None  # episode length (default: the task's)
    budgets: list = field(default_factory=lambda: list(BUDGETS))  # the teacher-use budgets one model learns
    eval_examples: int = 512  # examples of the eval split (a seeded random subset) decoded at every budget at the end (0: none)
    eval_split: str = "validation"  # split of the task used for the final evaluation
    eval_env_kwargs: dict = field(default_factory=dict)  # further overrides for the eval split (e.g. its data file)
    eval_batch_size: int = 64  # prompts per evaluation batch
    delta: float = 0.02  # tolerance δ of the budget check in summary.json: f ≤ b + δ (ceiling, floor ≥ 0) or |f − b| ≤ δ (target)
    calibrate_calls: bool = True  # as tw train's: after training, calibrate final/'s call threshold per budget on the eval_examples selection rows (call_rule.json), the rule tw eval and the decoders use by default; the summary's "eval" stays the raw rule π(<τ>) > ½
    calibration_tolerance: float = 0.005  # the threshold search stops once a budget's teacher fraction is this close

    def validate(self) -> None:
        for name in ("num_envs", "n_steps", "batch_size", "n_epochs", "lagrange_window", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.total_timesteps < 0 or self.checkpoint_every < 0 or self.eval_examples < 0:
            raise ValueError("total_timesteps, checkpoint_every and eval_examples must be >= 0")
        if self.lagrange_rule not in LAGRANGE_RULES:
            raise ValueError(f"lagrange_rule must be one of {list(LAGRANGE_RULES)}, got {self.lagrange_rule!r}")
        PIDGains(self.pid_kp, self.pid_ki, self.pid_kd, self.pid_smoothing)  # raises on bad gains
        if self.value_model not in ("head", "network"):
            raise ValueError(f"value_model must be 'head' or 'network', got {self.value_model!r}")
        if self.learning_rate <= 0 or (self.value_lr is not None and self.value_lr <= 0):
            raise ValueError("learning_rate and value_lr must be positive")
        if not 0 <= self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"gamma and gae_lambda must lie in [0, 1], got {self.gamma} and {self.gae_lambda}")
        if self.wall_time_seconds is not None and self.wall_time_seconds <= 0:
            raise ValueError(f"wall_time_seconds must be positive or None, got {self.wall_time_seconds}")
        if not self.budgets or any(not 0 <= b <= 1 for b in self.budgets):
            raise ValueError(f"budgets must be fractions in [0, 1], got {self.budgets}")
        if not 0 <= self.calibration_tolerance < 1:
            raise ValueError(f"calibration_tolerance must lie in [0, 1), got {self.calibration_tolerance}")

    @property
    def resolved_value_lr(self) -> float:
        if self.value_lr is not None:
            return self.value_lr
        return 1e-4 if self.value_model == "head" else 1e-6


def make_envs(config: PPOConfig, tasks: Tasks) -> tuple[SB3VecEnvAdapter, VecMonitor]:
    """The native vector env over the training task and its SB3 view (adapter + VecMonitor)."""
    from stable_baselines3.common.vec_env import VecMonitor

    envs = TeacherAssistedDecodingVectorEnv(config.num_envs, tasks.train, **tasks.env_options)
    adapter = SB3VecEnvAdapter(envs)
    return adapter, VecMonitor(adapter)


def make_model(config: PPOConfig, venv: VecEnv, init: Path, device: torch.device, tensorboard: Path) -> PPO:
    """SB3's PPO with :class:`LMActorCriticPolicy` around the phase-1 policy in ``init``."""
    from stable_baselines3 import PPO

    policy_kwargs = dict(
        student=str(init), value_model=config.value_model, value_hidden=tuple(config.value_hidden),
        value_lr_scale=config.resolved_value_lr / config.learning_rate,
        optimizer_class=torch.optim.AdamW, optimizer_kwargs={"weight_decay": config.weight_decay},
    )
    return PPO(
        LMActorCriticPolicy, venv, learning_rate=config.learning_rate, n_steps=config.n_steps,
        batch_size=config.batch_size, n_epochs=config.n_epochs, gamma=config.gamma, gae_lambda=config.gae_lambda,
        clip_range=config.clip_range, ent_coef=config.ent_coef, vf_coef=config.vf_coef,
        max_grad_norm=config.max_grad_norm, target_kl=config.target_kl, tensorboard_log=str(tensorboard),
        policy_kwargs=policy_kwargs, seed=config.seed, device=device, verbose=0,
    )


def run(config: PPOConfig) -> dict[str, Any]:
    """Train (or resume), evaluate every budget, save ``final``; returns the summary (also summary.json)."""
    from stable_baselines3.common.callbacks import CallbackList

    config.validate()
    out = Path(config.output_dir)
    init = phase1_policy_dir(config.init, out, "PPO")
    run_ = start_run(config, out)
    device = run_.device
    tasks = load_tasks(config.env_id, config.env_kwargs, config.eval_split, config.eval_env_kwargs, device,
                       budgets=config.budgets, max_new_tokens=config.max_new_tokens)
    adapter, venv = make_envs(config, tasks)
    run_dir, tensorboard = out / CHECKPOINTS, out / "tensorboard"
    lagrange = LagrangeCallback(config.budgets, lr=config.lagrange_lr, cap=config.lagrange_cap,
                                window=config.lagrange_window, floor=config.lagrange_floor, rule=config.lagrange_rule,
                                gains=PIDGains(config.pid_kp, config.pid_ki, config.pid_kd, config.pid_smoothing))
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        model = make_model(config, venv, init, device, tensorboard)
    else:
        model = resume_model(config, latest, adapter, venv, lagrange, device, tensorboard)
    save_checkpoint = checkpoint_saver(config, run_dir, lagrange, adapter)

    wall = WallTimeCallback(config.wall_time_seconds)
    t0 = time.time()
    remaining = config.total_timesteps - model.num_timesteps
    if remaining > 0:
        callbacks = CallbackList([lagrange, PeriodicCallback(config.checkpoint_every, save_checkpoint), wall])
        model.learn(remaining, callback=callbacks, reset_num_timesteps=latest is None, tb_log_name="ppo",
                    log_interval=1)
        save_checkpoint(model)
    train_seconds = time.time() - t0

    # Final evaluation (greedy over V + 1, teacher on call) on the eval split, sharing the loaded teacher.
    policy = model.policy
    if not isinstance(policy, LMActorCriticPolicy):
        raise TypeError(f"the PPO model's policy is a {type(policy).__name__}, expected an LMActorCriticPolicy")
    student = policy.student
    evaluation = final_evaluation(config, student, tasks)
    publish_dir(out / "final", student.save)
    call_rule = ship_call_rule(config, student, tasks, out / "final") if config.calibrate_calls else None
    summary = {
        "algo": "ppo",
        "timesteps": int(model.num_timesteps),
        "stopped_by_wall_time": wall.stopped,
        "train_seconds_this_run": train_seconds,
        "lambdas": {str(b): v for b, v in lagrange.lambdas.items()},
        "train_teacher_fractions": {str(b): f for b, f in lagrange.fractions.items()},
        "eval": evaluation,
    } | ({"call_rule": call_rule} if call_rule is not None else {})
    run_.write_summary(summary)
    venv.close()
    if run_.dist.is_main:
        print(end_of_ppo(summary, out, tasks.train.metric))
    return summary


def end_of_ppo(summary: dict[str, Any], out: Path, metric: str) -> str:
    """What `tw train --algo ppo` prints as it ends: per budget the final policy's teacher fraction and quality
    on the evaluation examples and the last λ; then where the files are (the whole summary: summary.json)."""
    title = f"tw train --algo ppo: {summary['timesteps']} timesteps in {summary['train_seconds_this_run']:.0f} s"
    shipped = {float(e["budget"]): e for e in summary.get("call_rule", {}).get("budgets", [])}
    table = [["budget", "teacher fraction (π>½)", f"quality ({metric})", "λ (last)"]
             + (["shipped c", "its fraction", "its quality"] if shipped else [])]
    results = {float(r["budget"]): r for r in (summary["eval"] or {"results": []})["results"]}
    for b, lam in summary["lambdas"].items():
        r, e = results.get(float(b), {}), shipped.get(float(b))
        table.append([f"{float(b):g}", *(format(r[k], f) if k in r else "-" for k, f in
                                         (("teacher_fraction", ".3f"), ("quality", ".2f"))), f"{lam:+.3f}"]
                     + ([f"{e['threshold']:.3g}", f"{e['teacher_fraction']:.3f}", f"{e['quality']:.2f}"] if e else
                        ["-"] * 3 if shipped else []))
    files = {"output": out, "final policy": out / "final", "summary": out / "summary.json",
             "TensorBoard": out / "tensorboard"}
    return end_report(title, table, files)


def resume_model(
    config: PPOConfig, latest: Path, adapter: SB3VecEnvAdapter, venv: VecMonitor, lagrange: LagrangeCallback,
    device: torch.device, tensorboard: Path,
) -> PPO:
    """Resume from the checkpoint ``latest``: weights, optimiser, counters from SB3; λ, its window and the
    normalisers from state.json."""
    from stable_baselines3 import PPO

    model = PPO.load(latest / "model.zip", env=venv, device=device, tensorboard_log=str(tensorboard))
    state = ckpt.load_json(latest / "state.json")
    lagrange.load_state_dict(state["lagrange"])
    model.set_random_seed(config.seed + model.num_timesteps)  # fresh draws, not a replay of the start
    obs = venv.reset()  # a seeded reset clears the normalisers: restore them after it
    if not isinstance(obs, dict):
        raise TypeError(f"expected Dict observations from the vector env, got {type(obs).__name__}")
    model._last_obs = obs
    model._last_episode_starts = np.ones(venv.num_envs, dtype=bool)
    adapter.reward_stats.load_state_dict(state["reward_stats"])
    return model


def checkpoint_saver(
    config: PPOConfig, run_dir: Path, lagrange: LagrangeCallback, adapter: SB3VecEnvAdapter
) -> Callable[[BaseAlgorithm], None]:
    """What writes a resumable checkpoint of a PPO model (SB3's model.zip; λ and the normalisers in state.json)."""
    rollout_size = config.n_steps * config.num_envs

    def save_checkpoint(model: BaseAlgorithm) -> None:
        state = {
            "num_timesteps": int(model.num_timesteps), "lagrange": lagrange.state_dict(),
            "reward_stats": adapter.reward_stats.state_dict(),
        }

        def write(folder: Path) -> None:
            model.save(folder / "model.zip")
            ckpt.save_json(folder / "state.json", state)

        # Numbered by rollout, so that folder names stay six digits and sort in order.
        ckpt.write_checkpoint(run_dir, -(-model.num_timesteps // rollout_size), write, keep=config.keep_checkpoints)

    return save_checkpoint


def ship_call_rule(config: PPOConfig, student: StudentPolicy, tasks: Tasks, final_dir: Path) -> dict[str, Any]:
    """Calibrate the final policy's call threshold per budget on the selection rows the final evaluation
    reads, and write it into ``final_dir`` (``call_rule.json``), as ``tw train`` does for ``best/``.

    Why: the ablation should hand a user what ``tw train`` hands them, a checkpoint whose own rule keeps its
    budgets; the raw rule's figures (``eval``) stay beside it, so the two algorithms compare as trained.
    """
    if not config.eval_examples:
        return {"skipped": "eval_examples 0: no selection rows to calibrate on"}
    examples = seeded_subset(tasks.selection.examples, config.eval_examples, config.seed)
    return ship_calibrated_call_rule(student, final_dir, tasks.selection, examples, config.budgets,
                                     tasks.train.max_new_tokens, config.eval_split, batch_size=config.eval_batch_size,
                                     tolerance=config.calibration_tolerance)


def final_evaluation(config: PPOConfig, student: StudentPolicy, tasks: Tasks) -> dict[str, Any] | None:
    """Every budget on a seeded subset of the evaluation split (None with ``eval_examples`` 0)."""
    if not config.eval_examples:
        return None
    ceiling = budgets_are_ceilings(config.lagrange_floor)
    examples = seeded_subset(tasks.selection.examples, config.eval_examples, config.seed)
    results = evaluate_budgets(student, tasks.selection, examples, config.budgets, tasks.train.max_new_tokens,
                               batch_size=config.eval_batch_size)
    return {
        "split": config.eval_split, "meets_budgets": meets_budgets(results, config.delta, ceiling),
        "worst_violation": worst_violation(results, ceiling), "mean_quality": mean_quality(results),
        "budget_rule": "ceiling" if ceiling else "target",
        "results": [dataclasses.asdict(r) for r in results],
    }
