"""Training Wheels training: phase 1 (behaviour cloning of the KL-ranked oracle) and phase 2
(PCL on the Eq. 17 reward with one Lagrange multiplier per budget).

Reads top to bottom: the config, setup, phase 1, phase 2 (rollout → oracle → replay → four PCL
updates → λ step), checkpoint selection, checkpointing. ``tw train --config FILE`` runs it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import tw_env  # noqa: F401  (registers the tasks)
from agents import checkpoint as ckpt
from agents.config import config_to_json
from agents.evaluation import (
    BudgetResult,
    budgets_are_ceilings,
    evaluate_budgets,
    mean_quality,
    meets_budgets,
    seeded_subset,
    worst_violation,
)
from agents.objectives import lagrange_step, pcl_loss, phase1_loss
from agents.policy import StudentPolicy, ValueNetwork
from agents.trajectories import (
    ReplayBuffer,
    Trajectories,
    collect_on_policy,
    oracle_batch,
    tokenize_prompts,
    tokenize_teacher_prompts,
)
from tw_env.atomic import publish_dir, write_json, write_text
from tw_env.budgets import BUDGETS
from tw_env.models import resolve_device
from tw_env.rewards import eq17_reward
from tw_env.tasks import env_data_source


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
    budgets: list = field(default_factory=lambda: list(BUDGETS))  # the teacher-use budgets one model learns
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
    value_lr: float = 1e-6  # value-network learning rate (§5.2)
    value_weight_decay: float = 1e-6  # value-network weight decay (§5.2)
    grad_clip: float = 1.0  # gradient-norm clip for both networks (0: off)
    lagrange_lr: float = 1e-2  # η of λ_b ← clip(λ_b + η(f_b − b), floor, cap) (§5.2)
    lagrange_cap: float = 2.0  # upper bound of λ_b (§5.2)
    lagrange_floor: float = 0.0  # lower bound of λ_b: 0 makes b a ceiling (the paper), < 0 a target (f = b)
    reward_clip: float = 2.0  # Eq. 17 rewards are clipped to [−clip, clip] (§2.4.2)
    lagrange_window: int = 4  # trailing on-policy batches whose teacher use drives λ
    # Checkpoint selection (§3.3), logging, checkpointing
    eval_every: int = 250  # batches between validation evaluations (0: only at the end)
    eval_examples: int = 512  # validation examples for checkpoint selection (a seeded random subset, §3.3)
    eval_split: str = "validation"  # split of the task used for selection
    allow_selection_on_training_data: bool = False  # select on the training examples when both read one source (warns)
    delta: float = 0.02  # tolerance δ: f ≤ b + δ per budget (a ceiling, floor ≥ 0) or |f − b| ≤ δ (a target, floor < 0)
    checkpoint_every: int = 50  # batches between resumable checkpoints
    keep_checkpoints: int = 2  # resumable checkpoints kept on disk

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


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class Setup:
    config: TrainConfig
    envs: gym.vector.VectorEnv
    teacher: torch.nn.Module
    train_examples: list
    eval_examples: list
    max_new_tokens: int
    device: torch.device
    out: Path
    writer: SummaryWriter


def check_selection_data(config: TrainConfig) -> None:
    """Refuse (or, when asked, loudly allow) checkpoint selection on the training examples.

    The two sources are compared before anything is loaded: a local file has no splits, so a run
    whose training and selection data are one file would select on what it trained on.
    """
    train_source = env_data_source(config.env_kwargs)
    selection_source = env_data_source({**config.env_kwargs, "split": config.eval_split, **config.eval_env_kwargs})
    if train_source != selection_source:
        return
    problem = (
        f"checkpoint selection would run on the training examples: training and selection (split "
        f"'{config.eval_split}') both read {train_source}"
    )
    if not config.allow_selection_on_training_data:
        raise ValueError(
            f"{problem}. Expected selection data apart from the training data: pass a folder with "
            "train.jsonl and validation.jsonl as env_kwargs 'data' (each split reads its own file), or "
            'the selection file as eval_env_kwargs: {"data": "validation.jsonl"}; set '
            "allow_selection_on_training_data to select on the training examples anyway."
        )
    print(f"WARNING: {problem}; selected checkpoints are scored on examples they were trained on "
          "(allow_selection_on_training_data is set).", file=sys.stderr, flush=True)


def make_setup(config: TrainConfig) -> Setup:
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    check_selection_data(config)
    env_kwargs = dict(config.env_kwargs)
    env_kwargs.setdefault("device", str(device))
    env_kwargs.setdefault("reward_clip", config.reward_clip)
    if config.max_new_tokens is not None:
        env_kwargs["max_new_tokens"] = config.max_new_tokens
    envs = gym.make_vec(
        config.env_id, num_envs=config.num_envs, vectorization_mode="vector_entry_point",
        budgets=config.budgets, **env_kwargs,
    )
    # The selection split shares the loaded teacher: nothing is loaded twice.
    eval_kwargs = {**env_kwargs, "teacher": envs.teacher, "split": config.eval_split, **config.eval_env_kwargs}
    eval_env = gym.make(config.env_id, budgets=config.budgets, **eval_kwargs).unwrapped
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.json", config_to_json(config))
    return Setup(
        config, envs, envs.teacher, envs.examples, seeded_subset(eval_env.examples, config.eval_examples, config.seed),
        envs.max_new_tokens, device, out, SummaryWriter(str(out / "tensorboard")),
    )


def student_source(setup: Setup) -> str:
    source = setup.config.student or setup.envs.student
    if source is None:
        raise ValueError("no student model: pass --student (a hub id or a directory) or a task with a default student")
    return str(source) if not isinstance(source, torch.nn.Module) else source


def run(config: TrainConfig) -> dict:
    """Run the phases the config asks for; returns a summary (also written to OUTPUT_DIR/summary.json)."""
    setup = make_setup(config)
    summary: dict = {}
    if config.phase in ("bc", "both"):
        summary["phase1"] = train_phase1(setup)
    if config.phase in ("pcl", "both"):
        summary["phase2"] = train_phase2(setup)
    write_json(setup.out / "summary.json", summary)
    setup.writer.close()
    return summary


# ---------------------------------------------------------------------------------------------- phase 1
def round_up_draws(config: TrainConfig, rng: np.random.Generator, rows: int, device) -> torch.Tensor | None:
    """Uniform draws for the oracle's stochastic rounding, or None for the paper's floor."""
    if config.oracle_rounding == "floor":
        return None
    return torch.as_tensor(rng.random(rows), device=device)


def train_phase1(setup: Setup) -> dict:
    """Behaviour cloning of the oracle: −log π(<τ>) at the top ⌊l·b⌋ KL positions, KL elsewhere."""
    config, run_dir = setup.config, setup.out / "phase1-checkpoints"
    final_dir = setup.out / "phase1"
    if (final_dir / "done.json").exists():
        return json.loads((final_dir / "done.json").read_text())
    policy = StudentPolicy.load(student_source(setup), device=setup.device)
    policy.eval()  # dropout off (§5.2); gradients still flow
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.bc_lr, weight_decay=config.bc_weight_decay)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    start = 0
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None:
        policy = StudentPolicy.load(latest / "policy", device=setup.device).eval()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=config.bc_lr, weight_decay=config.bc_weight_decay)
        ckpt.load_optimizer(latest / "optimizer.pt", optimizer)
        state = ckpt.load_json(latest / "state.json")
        ckpt.restore_rng_state(state["rng"], rng)
        start = state["step"]
    eos = setup.envs.tokenizer.eos_token_id
    t0 = time.time()
    progress = tqdm(range(start, config.bc_batches), desc="phase 1 (BC)", initial=start, total=config.bc_batches)
    for step in progress:
        index = rng.integers(len(setup.train_examples), size=config.bc_batch_size)
        budgets = rng.choice(np.array(config.budgets, dtype=np.float64), size=config.bc_batch_size)
        sources = [setup.train_examples[i].source for i in index]
        ids, mask = tokenize_prompts(setup.envs, sources, budgets.tolist(), setup.device)
        oracle = oracle_batch(
            setup.teacher, policy, ids, mask, torch.as_tensor(budgets, device=setup.device),
            setup.max_new_tokens, eos, round_up_draws(config, rng, config.bc_batch_size, setup.device),
            tokenize_teacher_prompts(setup.envs, sources, budgets.tolist(), setup.device),
        )
        traj = oracle.trajectories
        logits = policy(ids, mask, traj.state_ids, traj.mask.long())
        loss = phase1_loss(logits, oracle.teacher_logits, traj.is_call, traj.mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
        optimizer.step()
        setup.writer.add_scalar("phase1/loss", loss.item(), step)
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.bc_batches:
            def write(folder: Path, step=step) -> None:
                policy.save(folder / "policy")
                ckpt.save_optimizer(folder / "optimizer.pt", optimizer)
                ckpt.save_json(folder / "state.json", {"step": step + 1, "rng": ckpt.rng_state(rng)})
            ckpt.write_checkpoint(run_dir, step + 1, write, keep=config.keep_checkpoints)
    summary = {"batches": config.bc_batches, "seconds_this_run": time.time() - t0}

    def build(folder: Path) -> None:
        policy.save(folder)
        write_json(folder / "done.json", summary)

    publish_dir(final_dir, build)
    return summary


# ---------------------------------------------------------------------------------------------- phase 2
def episode_rewards(
    batch: Trajectories, lambdas: dict[float, float], mu: float, sigma: float, clip: float = 2.0
) -> torch.Tensor:
    """Eq. 17 rewards of a batch, recomputed from its raw parts with the current λ and normalisers."""
    lam = np.array([lambdas[_budget_key(lambdas, b)] for b in batch.budget.tolist()])[:, None]
    rewards = eq17_reward(
        batch.teacher_logprob.cpu().numpy(), batch.is_call.cpu().numpy(), batch.budget.cpu().numpy()[:, None],
        lam, mu, sigma, clip=clip,
    )
    return torch.as_tensor(rewards, dtype=torch.float32, device=batch.mask.device) * batch.mask


def _budget_key(lambdas: dict[float, float], budget: float) -> float:
    return min(lambdas, key=lambda b: abs(b - budget))


def pcl_update(
    policy: StudentPolicy, value: ValueNetwork, batch: Trajectories, rewards: torch.Tensor, config: TrainConfig,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
) -> float:
    """One gradient step of both networks on the soft path-consistency loss."""
    mask = batch.mask
    logits = policy(batch.prompt_ids, batch.prompt_mask, batch.state_ids, mask.long()).float()
    log_pi = torch.log_softmax(logits, dim=-1).gather(-1, batch.actions[..., None]).squeeze(-1)
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
    loss.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
        torch.nn.utils.clip_grad_norm_(value.parameters(), config.grad_clip)
    for optimizer in optimizers:
        optimizer.step()
    return float(loss.item())


def trailing_fractions(history: deque) -> dict[float, float]:
    """Token-level teacher fraction per budget over the trailing on-policy batches."""
    totals: dict[float, list[int]] = {}
    for batch_counts in history:
        for b, (calls, tokens) in batch_counts.items():
            acc = totals.setdefault(b, [0, 0])
            acc[0] += calls
            acc[1] += tokens
    return {b: calls / tokens for b, (calls, tokens) in totals.items() if tokens > 0}


def train_phase2(setup: Setup) -> dict:
    """PCL with the Lagrangian: the paper's phase 2, with checkpoint selection on validation."""
    config, run_dir = setup.config, setup.out / "phase2-checkpoints"
    envs, device = setup.envs, setup.device
    init = Path(config.init) if config.init else setup.out / "phase1"
    if not init.exists():
        raise FileNotFoundError(f"phase 2 starts from a phase-1 policy, but '{init}' does not exist; run phase 1 "
                                "first (--phase bc or both) or pass --init DIR")
    # Every random stream of phase 2 comes from the run's seed: the trainer's draws, the rollout
    # sampler, the value head's initialisation and the env's own generator (teacher sampling).
    torch.manual_seed(config.seed + 1)
    policy = StudentPolicy.load(init, device=device).eval()
    value = ValueNetwork.from_policy(policy).eval()
    rng = np.random.default_rng(config.seed + 1)
    generator = torch.Generator().manual_seed(config.seed + 1)
    envs.np_random = np.random.default_rng(config.seed + 2)
    lambdas = {float(b): 0.0 for b in config.budgets}
    history: deque = deque(maxlen=config.lagrange_window)
    replay = ReplayBuffer(config.replay_capacity)
    selection: dict = {"best": None, "evaluations": []}
    start = 0

    def optimizers_for(policy, value):
        return (
            torch.optim.AdamW(policy.parameters(), lr=config.policy_lr, weight_decay=config.policy_weight_decay),
            torch.optim.AdamW(value.parameters(), lr=config.value_lr, weight_decay=config.value_weight_decay),
        )

    optimizers = optimizers_for(policy, value)
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None:  # resume exactly: models, optimisers, λ, replay, normalisers, RNGs, step
        policy = StudentPolicy.load(latest / "policy", device=device).eval()
        value = ValueNetwork.from_policy(policy).eval()
        load_model(value, str(latest / "value.safetensors"), device=str(device))
        optimizers = optimizers_for(policy, value)
        ckpt.load_optimizer(latest / "policy_optimizer.pt", optimizers[0])
        ckpt.load_optimizer(latest / "value_optimizer.pt", optimizers[1])
        replay.load(latest / "replay.safetensors")
        state = ckpt.load_json(latest / "state.json")
        start = state["step"]
        lambdas = {float(b): lam for b, lam in state["lambdas"]}
        history = deque([{float(b): tuple(v) for b, v in h} for h in state["history"]], maxlen=config.lagrange_window)
        selection = state["selection"]
        envs.reward_stats.load_state_dict(state["reward_stats"])
        envs.np_random.bit_generator.state = state["env_rng"]
        ckpt.restore_rng_state(state["rng"], rng)
        generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
    budgets_cycle = np.array(config.budgets, dtype=np.float64)
    t0 = time.time()
    if start == 0 and config.eval_every:  # the phase-1 policy is a candidate too
        results = evaluate_budgets(policy, envs, setup.eval_examples, config.budgets, setup.max_new_tokens)
        selection = select_checkpoint(setup, policy, results, 0, selection)
    progress = tqdm(range(start, config.pcl_batches), desc="phase 2 (PCL)", initial=start, total=config.pcl_batches)
    for step in progress:
        # 1. One on-policy episode per prompt, budgets balanced over the batch.
        budgets = rng.permutation(np.resize(budgets_cycle, config.num_envs))
        index = rng.integers(len(setup.train_examples), size=config.num_envs)
        envs.set_lagrange_multipliers(lambdas)
        on_policy, _ = collect_on_policy(envs, policy, budgets.tolist(), index.tolist(), generator, config.rollout_temperature)
        # 2. One oracle (off-policy) episode per prompt.
        oracle = oracle_batch(
            setup.teacher, policy, on_policy.prompt_ids, on_policy.prompt_mask, on_policy.budget,
            setup.max_new_tokens, envs.tokenizer.eos_token_id, round_up_draws(config, rng, config.num_envs, device),
            tokenize_teacher_prompts(envs, [setup.train_examples[i].source for i in index], budgets.tolist(), device),
        ).trajectories
        # 3. Four updates on a mix of replay, oracle and on-policy episodes.
        losses = []
        mu, sigma = envs.reward_stats.mu, envs.reward_stats.sigma
        for _ in range(config.updates_per_batch):
            parts = [on_policy, oracle]
            replayed = replay.sample(config.replay_per_update, generator)
            if replayed is not None:
                parts.append(replayed.to(device))
            batch = Trajectories.concat(parts)
            rewards = episode_rewards(batch, lambdas, mu, sigma, config.reward_clip)
            losses.append(pcl_update(policy, value, batch, rewards, config, optimizers))
        replay.add(on_policy)
        replay.add(oracle)
        # 4. The Lagrangian step from the trailing on-policy teacher use.
        history.append(on_policy.teacher_fraction_by_budget())
        fractions = trailing_fractions(history)
        lambdas = lagrange_step(lambdas, {_budget_key(lambdas, b): f for b, f in fractions.items()},
                                lr=config.lagrange_lr, cap=config.lagrange_cap, floor=config.lagrange_floor)
        # Logging.
        w = setup.writer
        w.add_scalar("pcl/loss", float(np.mean(losses)), step)
        on_rewards = episode_rewards(on_policy, lambdas, mu, sigma, config.reward_clip)
        w.add_scalar("pcl/reward_per_token", float(on_rewards.sum() / on_policy.mask.sum()), step)
        w.add_scalar("pcl/reward_mu", mu, step)
        w.add_scalar("pcl/reward_sigma", sigma, step)
        student_tokens = on_policy.mask & ~on_policy.is_call
        w.add_scalar("pcl/student_token_teacher_logprob",
                     float(on_policy.teacher_logprob[student_tokens].mean()) if student_tokens.any() else 0.0, step)
        for b, f in fractions.items():
            w.add_scalar(f"teacher_fraction/b={b:.1f}", f, step)
            w.add_scalar(f"lambda/b={b:.1f}", lambdas[_budget_key(lambdas, b)], step)
        progress.set_postfix(loss=f"{np.mean(losses):.3f}", frac=" ".join(f"{f:.2f}" for _, f in sorted(fractions.items())))
        # 5. Checkpoint selection on validation (§3.3).
        done = step + 1 == config.pcl_batches
        if (config.eval_every and (step + 1) % config.eval_every == 0) or done:
            results = evaluate_budgets(policy, envs, setup.eval_examples, config.budgets, setup.max_new_tokens)
            selection = select_checkpoint(setup, policy, results, step + 1, selection)
        # 6. Resumable checkpoint.
        if (step + 1) % config.checkpoint_every == 0 and not done:
            state = {
                "step": step + 1, "lambdas": list(lambdas.items()),
                "history": [list(h.items()) for h in history], "selection": selection,
                "reward_stats": envs.reward_stats.state_dict(), "rng": ckpt.rng_state(rng),
                "env_rng": envs.np_random.bit_generator.state,
                "generator": generator.get_state().tolist(),
            }

            def write(folder: Path, state=state) -> None:
                policy.save(folder / "policy")
                save_model(value, str(folder / "value.safetensors"))
                ckpt.save_optimizer(folder / "policy_optimizer.pt", optimizers[0])
                ckpt.save_optimizer(folder / "value_optimizer.pt", optimizers[1])
                replay.save(folder / "replay.safetensors")
                ckpt.save_json(folder / "state.json", state)
            ckpt.write_checkpoint(run_dir, step + 1, write, keep=config.keep_checkpoints)
    publish_dir(setup.out / "final", policy.save)
    return {"batches": config.pcl_batches, "seconds_this_run": time.time() - t0, "lambdas": lambdas,
            "reward_normalisers": {"mu": envs.reward_stats.mu, "sigma": envs.reward_stats.sigma}, "selection": selection}


def select_checkpoint(setup: Setup, policy: StudentPolicy, results: list[BudgetResult], step: int, selection: dict) -> dict:
    """Keep the policy that meets every budget within δ with the best mean quality (§3.3).

    "Meets" follows the Lagrangian's semantics (:func:`~agents.evaluation.budget_violation`): with
    ``lagrange_floor`` ≥ 0 a budget is a ceiling (f ≤ b + δ), below 0 a target (|f − b| ≤ δ).

    Until some evaluation meets every budget, the one with the smallest worst violation is kept,
    so a run always leaves a usable ``best`` policy; ``summary.json`` says which rule chose it.
    """
    config = setup.config
    ceiling = budgets_are_ceilings(config.lagrange_floor)
    record = {
        "step": step, "meets_budgets": meets_budgets(results, config.delta, ceiling),
        "worst_violation": worst_violation(results, ceiling), "mean_quality": mean_quality(results),
        "budget_rule": "ceiling" if ceiling else "target",
        "results": [dataclasses.asdict(r) for r in results],
    }
    for r in results:
        setup.writer.add_scalar(f"eval/teacher_fraction/b={r.budget:.1f}", r.teacher_fraction, step)
        setup.writer.add_scalar(f"eval/quality/b={r.budget:.1f}", r.quality, step)
    best = selection["best"]
    better = (
        best is None
        or (record["meets_budgets"] and not best["meets_budgets"])
        or (record["meets_budgets"] and best["meets_budgets"] and record["mean_quality"] > best["mean_quality"])
        or (not record["meets_budgets"] and not best["meets_budgets"] and record["worst_violation"] < best["worst_violation"])
    )
    selection = {"best": record if better else best, "evaluations": selection["evaluations"] + [record]}
    if better:
        def build(folder: Path) -> None:
            policy.save(folder)
            write_json(folder / "selection.json", record)

        publish_dir(setup.out / "best", build)
    return selection
