"""REINFORCE with a per-budget Lagrangian: a student that learns *when* to ask its teacher.

The student LM stays frozen and proposes its greedy next token; the agent is a small network that
reads how sure the student is (and the budget) and decides whether to emit that token or the
teacher call <τ>. It is trained with REINFORCE and a learned baseline on the Eq. 17 reward of the
native vector env, with one Lagrange multiplier λ_b per budget. The walk-through is
docs/tutorial.md; every argument is in ``--help``.

    python examples/reinforce_lagrangian.py                # the embedded task (docs/tutorial.md: minutes on a laptop CPU)
    python examples/reinforce_lagrangian.py --env-id TrainingWheels-SyntheticCausal-v0   # the same task, causal LMs
    tensorboard --logdir runs/reinforce_lagrangian         # teacher use, λ and the losses while it trains
"""

import argparse
import csv
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import tw_env  # noqa: F401  (registers the tasks)
from agents.lagrangian import BudgetDual
from tw_env.families import family_of
from tw_env.metrics import quality
from tw_env.models import load_model


@dataclass
class Args:
    env_id: str = "TrainingWheels-Synthetic-v0"
    """the registered task, of either model family (TrainingWheels-SyntheticCausal-v0: the embedded task with
    causal LMs); the embedded ones train their teacher and student on first use"""
    teacher: str | None = None
    """the teacher (a directory or hub id); None: the task's"""
    student: str | None = None
    """the student (a directory or hub id); None: the task's"""
    tokenizer: str | None = None
    """the shared tokenizer; None: the task's"""
    data: str | None = None
    """the task's data (a folder of split files); None: the task's"""
    seed: int = 1
    """seed of the agent's initialisation, its call draws and the choice of training prompts"""
    threads: int = 1
    """torch CPU threads (0: torch's default); the models are tiny, and one thread is fastest"""
    total_batches: int = 400
    """training batches; each plays one episode per row of the vector env, then takes one update"""
    num_envs: int = 64
    """rows of the native vector env: the episodes of one batch"""
    budgets: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    """the teacher-use budgets the agent trains on (each row draws one)"""
    learning_rate: float = 0.05
    """Adam learning rate of the actor and the critic"""
    gamma: float = 0.9
    """discount of the return-to-go that weighs each decision"""
    ent_coef: float = 0.01
    """weight of the entropy bonus of the call decision"""
    vf_coef: float = 0.5
    """weight of the critic's (baseline's) squared error in the loss"""
    reward_clip: float = 8.0
    """the env clips every Eq. 17 reward to [-reward_clip, reward_clip] (the paper: 2; a call then costs at
    most reward_clip whatever λ_b is, so the λ cap is set to match it)"""
    teacher_sampling: bool = False
    """on <τ> the teacher samples its token (temperature 1) instead of taking its greedy one, in training and evaluation"""
    lagrange_lr: float = 0.5
    """step size of λ_b ← clip(λ_b + lr·(f_b − b), floor, cap)"""
    lagrange_floor: float = -8.0
    """lower bound of λ_b: below 0, a budget is a target (calls are paid for when f_b < b)"""
    lagrange_cap: float = 8.0
    """upper bound of λ_b"""
    lagrange_window: int = 4
    """trailing batches whose teacher fraction f_b drives λ_b"""
    anneal: bool = True
    """decay the learning rate and the λ step linearly to 0 over training, so that both settle"""
    greedy_eval: bool = False
    """at test time call iff π(<τ> | s) > ½ (our PCL evaluation's rule) instead of sampling the call"""
    eval_split: str = "test"
    """split of the final evaluation (tune on "validation", report on "test")"""
    eval_examples: int = 512
    """examples of the final evaluation, decoded at every budget (the first ones of the split)"""
    output_dir: str = "runs/reinforce_lagrangian"
    """TensorBoard logs, results.json and the plot"""
    compare_csv: str = str(Path(__file__).resolve().parents[1] / "docs" / "results-synthetic.csv")
    """our PCL agent's measured results (tw eval's CSV) for the table and the plot ("" for none; the causal
    task's: docs/results-synthetic-causal.csv)"""


# ---------------------------------------------------------------------------------------- the student
class Student:
    """The task's student LM, frozen: its greedy next token, and the features the agent reads.

    Either model family (a T5 or a causal LM, e.g. ``--env-id TrainingWheels-SyntheticCausal-v0``): the
    family (``tw_env.families``) says how the LM reads a prompt and the output so far."""

    def __init__(self, name: str, vocab_size: int) -> None:
        self.lm = load_model(name, role="student").requires_grad_(False)  # safetensors only, in eval mode
        self.family = family_of(self.lm)
        self.vocab_size = vocab_size  # action V is <τ>

    @torch.no_grad()
    def start(self, obs: dict) -> None:
        """Take the batch's prompts (every row starts an episode)."""
        length = torch.as_tensor(obs["prompt_length"][:, 0])
        width = int(length.max())
        self.prompt_mask = (torch.arange(width)[None] < length[:, None]).long()
        self.prompt_ids = torch.as_tensor(obs["prompt_ids"][:, :width])

    @torch.no_grad()
    def read(self, obs: dict) -> tuple[np.ndarray, torch.Tensor]:
        """The student's next token per row, and the state s = (its confidence, the budget) per row."""
        step = int(obs["state_length"].max())
        output = torch.as_tensor(obs["state_ids"][:, :step] % self.vocab_size)  # X^(out): teacher tokens are t + V in X^(in)
        # One forward over the prompt and the output so far (the family's: T5's encoder and decoder, a causal LM's sequence).
        logits = self.family.next_token_logits(self.lm, self.prompt_ids, self.prompt_mask, output)
        log_p = torch.log_softmax(logits[:, : self.vocab_size], -1)
        top2 = log_p.topk(2, -1).values
        entropy = -(log_p.exp() * log_p).sum(-1)
        budget = torch.as_tensor(obs["budget"][:, 0])
        state = torch.stack([top2[:, 0], top2[:, 0] - top2[:, 1], entropy, budget], -1)
        return log_p.argmax(-1).numpy(), state


N_FEATURES = 3  # the columns of Student.read's state before the budget: the student's confidence


# ---------------------------------------------------------------------------------------- the agent
class Agent(nn.Module):
    """The actor: a score of how much the student needs help (linear in its confidence) against one
    threshold per budget, the logit of π(<τ> | s); the critic V(s), the baseline: linear per budget."""

    def __init__(self, budgets: list[float]) -> None:
        super().__init__()
        self.budgets = torch.tensor(budgets, dtype=torch.float32)
        self.score = nn.Linear(N_FEATURES, 1)
        self.thresholds = nn.Parameter(torch.zeros(len(budgets)))
        self.critic = nn.Linear(N_FEATURES, len(budgets))

    def budget_index(self, state: torch.Tensor) -> torch.Tensor:
        return (state[..., -1:] - self.budgets).abs().argmin(-1)  # the row's budget (observations are float32)

    def call_logit(self, state: torch.Tensor) -> torch.Tensor:
        return self.score(state[..., :N_FEATURES]).squeeze(-1) - self.thresholds[self.budget_index(state)]

    def value(self, state: torch.Tensor) -> torch.Tensor:
        values = self.critic(state[..., :N_FEATURES])
        return values.gather(-1, self.budget_index(state)[..., None]).squeeze(-1)


# ---------------------------------------------------------------------------------------- episodes
@dataclass
class Episodes:
    """One episode per row of the vector env, step by step: ``[N, T]`` tensors (``alive``: a real step)."""

    states: torch.Tensor  # [N, T, N_FEATURES]
    calls: torch.Tensor  # [N, T] 1.0 where the agent called the teacher
    rewards: torch.Tensor  # [N, T] Eq. 17, as the env paid it
    alive: torch.Tensor  # [N, T] bool
    budgets: np.ndarray  # [N]
    outputs: list[str]
    references: list[str]

    def teacher_use(self) -> dict[float, tuple[int, int]]:
        """{budget: (teacher calls, output tokens)}, what the Lagrangian reads."""
        calls, tokens = (self.calls * self.alive).sum(1), self.alive.sum(1)
        return {float(b): (int(calls[self.budgets == b].sum()), int(tokens[self.budgets == b].sum()))
                for b in np.unique(self.budgets)}


def play(envs: gym.vector.VectorEnv, student: Student, decide: Callable[[torch.Tensor], torch.Tensor],
         budgets: np.ndarray, indices: np.ndarray) -> Episodes:
    """Play one episode per row (no autoreset): row i decodes example indices[i] at budgets[i].

    ``decide(states)`` returns 1.0 where the agent calls the teacher; elsewhere it emits the student's token.
    """
    obs, _ = envs.reset(options={"budget": budgets.tolist(), "index": indices.tolist(), "autoreset": False})
    student.start(obs)
    done = np.zeros(envs.num_envs, dtype=bool)
    outputs, references = [""] * envs.num_envs, [""] * envs.num_envs
    steps = []
    while not done.all():
        token, state = student.read(obs)
        call = decide(state)
        obs, reward, terminated, truncated, info = envs.step(np.where(call.numpy() > 0, student.vocab_size, token))
        steps.append((state, call, torch.as_tensor(reward, dtype=torch.float32), torch.as_tensor(~done)))
        for row in np.flatnonzero((terminated | truncated) & ~done):
            outputs[row], references[row] = info["output_text"][row], info["reference"][row]
        done |= terminated | truncated
    states, calls, rewards, alive = (torch.stack(parts, 1) for parts in zip(*steps, strict=True))
    return Episodes(states, calls, rewards, alive, budgets, outputs, references)


def returns_to_go(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + γ·G_{t+1} along each row (rewards after an episode's end are 0)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros(len(rewards))
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


# ---------------------------------------------------------------------------------------- evaluation
def evaluate(envs: gym.vector.VectorEnv, student: Student, decide: Callable[[torch.Tensor], torch.Tensor],
             budgets: list[float], examples: int) -> list[dict]:
    """Teacher fraction (calls / output tokens) and the task's metric of ``examples`` examples, per budget."""
    metric = envs.unwrapped.metric
    rows = []
    for b in budgets:
        calls = tokens = 0
        outputs, references = [], []
        for first in range(0, examples, envs.num_envs):
            indices = np.arange(first, first + envs.num_envs) % examples  # the last batch wraps around
            keep = min(envs.num_envs, examples - first)
            episodes = play(envs, student, decide, np.full(envs.num_envs, b), indices)
            calls += int((episodes.calls * episodes.alive)[:keep].sum())
            tokens += int(episodes.alive[:keep].sum())
            outputs += episodes.outputs[:keep]
            references += episodes.references[:keep]
        rows.append({"budget": b, "teacher_fraction": calls / tokens, metric: quality(metric, outputs, references)})
    return rows


def pcl_results(path: str) -> dict[float, dict]:
    """Our PCL agent's held-out rows from ``tw eval``'s CSV (docs/results-synthetic.csv), by budget."""
    if not path or not Path(path).exists():
        return {}
    with open(path) as f:
        return {float(r["budget"]): r for r in csv.DictReader(f) if r["method"] == "training_wheels"}


def report(results: dict, args: Args) -> None:
    """Print the table and plot teacher use and quality against our PCL agent's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, pcl = results["metric"], pcl_results(args.compare_csv)
    print(f"\n{'budget':>8} {'teacher fraction':>17} {metric:>7}   {'PCL fraction':>12} {'PCL ' + metric:>9}")
    for r in results["agent"]:
        p = pcl.get(r["budget"])
        theirs = f"{float(p['teacher_fraction']):12.3f} {float(p['quality']):9.1f}" if p else f"{'–':>12} {'–':>9}"
        print(f"{r['budget']:8.1f} {r['teacher_fraction']:17.3f} {r[metric]:7.1f}   {theirs}")
    for name in ("student alone", "teacher alone"):
        print(f"{name:>17} {results[name]['teacher_fraction']:8.3f} {results[name][metric]:7.1f}")
    fig, (use, score) = plt.subplots(1, 2, figsize=(10, 4))
    ours = results["agent"]
    use.plot([0, 0.5], [0, 0.5], ":", color="grey", label="f = b")
    use.plot([r["budget"] for r in ours], [r["teacher_fraction"] for r in ours], "o-", label="REINFORCE (this run)")
    score.plot([r["teacher_fraction"] for r in ours], [r[metric] for r in ours], "o-", label="REINFORCE (this run)")
    if pcl:
        use.plot(list(pcl), [float(p["teacher_fraction"]) for p in pcl.values()], "s--", label=f"PCL ({Path(args.compare_csv).name})")
        score.plot([float(p["teacher_fraction"]) for p in pcl.values()], [float(p["quality"]) for p in pcl.values()],
                   "s--", label=f"PCL ({Path(args.compare_csv).name})")
    for name, marker in (("student alone", "v"), ("teacher alone", "^")):
        score.plot(results[name]["teacher_fraction"], results[name][metric], marker, color="black", label=name)
    use.set(xlabel="budget b", ylabel="teacher fraction (held-out)", title="teacher use")
    score.set(xlabel="teacher fraction", ylabel=metric, title="quality against teacher use")
    use.legend()
    score.legend()
    fig.tight_layout()
    fig.savefig(Path(args.output_dir) / "reinforce_vs_pcl.png", dpi=120)
    plt.close(fig)
    print(f"plot: {Path(args.output_dir) / 'reinforce_vs_pcl.png'}")


# ---------------------------------------------------------------------------------------- training
def train(args: Args) -> dict:
    """Train the agent, evaluate it on held-out data, print and plot the results; returns them."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    models = {k: v for k, v in (("teacher", args.teacher), ("student", args.student),
                                ("tokenizer", args.tokenizer), ("data", args.data)) if v is not None}
    envs = gym.make_vec(args.env_id, num_envs=args.num_envs, vectorization_mode="vector_entry_point",
                        reward_clip=args.reward_clip, teacher_sampling=args.teacher_sampling, split="train",
                        budgets=args.budgets, **models)
    envs.reset(seed=args.seed)
    student = Student(str(envs.unwrapped.student), envs.unwrapped.vocab_size)
    agent = Agent(args.budgets)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate)
    dual = BudgetDual(args.budgets, lr=args.lagrange_lr, cap=args.lagrange_cap, floor=args.lagrange_floor,
                      window=args.lagrange_window)
    writer = SummaryWriter(args.output_dir)
    writer.add_text("args", json.dumps(asdict(args), indent=1))
    start = time.time()

    def sample_calls(states: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(agent.call_logit(states)))

    for batch in range(args.total_batches):
        if args.anneal:
            remaining = 1 - batch / args.total_batches
            optimizer.param_groups[0]["lr"], dual.lr = args.learning_rate * remaining, args.lagrange_lr * remaining
        # 1. Rollout: one episode per row, each row with its own budget; λ_b sets the price of a call.
        envs.unwrapped.set_lagrange_multipliers(dual.lambdas)
        budgets = rng.choice(args.budgets, size=args.num_envs)
        indices = rng.integers(len(envs.unwrapped.examples), size=args.num_envs)
        with torch.no_grad():
            episodes = play(envs, student, sample_calls, budgets, indices)
        # 2. REINFORCE with a baseline: raise log π(decision) where its return beat the critic's guess.
        returns = returns_to_go(episodes.rewards, args.gamma)
        policy = torch.distributions.Bernoulli(logits=agent.call_logit(episodes.states))
        values = agent.value(episodes.states)
        alive = episodes.alive
        advantages = (returns - values).detach()[alive]
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        policy_loss = -(advantages * policy.log_prob(episodes.calls)[alive]).mean()
        value_loss = ((returns - values)[alive] ** 2).mean()
        entropy = policy.entropy()[alive].mean()
        loss = policy_loss + args.vf_coef * value_loss - args.ent_coef * entropy
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # 3. The Lagrangian: λ_b rises while budget b's trailing teacher fraction is above b, falls below it.
        dual.record(episodes.teacher_use())
        dual.step()
        # 4. Logging.
        writer.add_scalar("losses/policy", policy_loss.item(), batch)
        writer.add_scalar("losses/value", value_loss.item(), batch)
        writer.add_scalar("losses/entropy", entropy.item(), batch)
        writer.add_scalar("charts/episode_reward", (episodes.rewards.sum(1)).mean().item(), batch)
        writer.add_scalar("charts/batches_per_second", (batch + 1) / (time.time() - start), batch)
        for b, f in dual.fractions.items():
            writer.add_scalar(f"teacher_fraction/b={b}", f, batch)
            writer.add_scalar(f"lambda/b={b}", dual.lambdas[b], batch)
        if batch % 50 == 0 or batch == args.total_batches - 1:
            fractions = " ".join(f"{dual.fractions.get(b, 0):.2f}" for b in args.budgets)
            lambdas = " ".join(f"{dual.lambdas[b]:+.2f}" for b in args.budgets)
            print(f"batch {batch}: teacher fractions {fractions}, λ {lambdas} ({time.time() - start:.0f} s)", flush=True)

    # Held-out evaluation: the agent samples its calls as in training (or calls iff π(<τ> | s) > ½).
    generator = torch.Generator().manual_seed(args.seed)

    def policy_calls(states: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(agent.call_logit(states))
        return (p > 0.5).float() if args.greedy_eval else torch.bernoulli(p, generator=generator)

    eval_envs = gym.make_vec(args.env_id, num_envs=args.num_envs, vectorization_mode="vector_entry_point",
                             teacher_sampling=args.teacher_sampling, split=args.eval_split,
                             limit=args.eval_examples, **models)
    eval_envs.reset(seed=args.seed)  # seeds the teacher's draws when it samples
    examples = min(args.eval_examples, len(eval_envs.unwrapped.examples))
    with torch.no_grad():
        results = {
            "metric": eval_envs.unwrapped.metric, "train_seconds": time.time() - start, "lambdas": dual.lambdas,
            "agent": evaluate(eval_envs, student, policy_calls, args.budgets, examples),
            "student alone": evaluate(eval_envs, student, lambda s: torch.zeros(len(s)), [0.0], examples)[0],
            "teacher alone": evaluate(eval_envs, student, lambda s: torch.ones(len(s)), [0.0], examples)[0],
        }
    Path(args.output_dir, "results.json").write_text(json.dumps(results, indent=1))
    report(results, args)
    writer.close()
    return results


def parse_args() -> Args:
    """``Args`` from the command line: one ``--flag`` per field, its docstring as the help."""
    from agents.config import add_config_arguments, config_from_namespace

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, Args)
    return config_from_namespace(Args, parser.parse_args())


if __name__ == "__main__":
    train(parse_args())
