"""The per-budget dual of Eq. 17: one Lagrange multiplier λ_b per budget, shared by PCL and the PPO ablation.

After every rollout the trainer records, per budget, how many teacher calls and tokens its
on-policy episodes had; λ_b then takes one projected step from the token-level teacher fraction
of the trailing ``window`` rollouts: λ_b ← clip(λ_b + η (f_b − b), floor, cap)
(:func:`~agents.objectives.lagrange_step`, notes.md item 7). ``state_dict``/``load_state_dict``
make it part of a resumable checkpoint.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from agents.objectives import lagrange_step

Counts = Mapping[float, tuple[float, float]]  # {budget: (teacher calls, output tokens)} of one rollout


def trailing_fractions(history: Iterable[Counts]) -> dict[float, float]:
    """Token-level teacher fraction per budget over the rollouts in ``history``."""
    return {b: calls / tokens for b, (calls, tokens) in merge_counts(history).items() if tokens > 0}


def merge_counts(parts: Iterable[Counts]) -> dict[float, tuple[float, float]]:
    """{budget: (calls, tokens)} summed over several rollouts (e.g. one per data-parallel rank)."""
    totals: dict[float, tuple[float, float]] = {}
    for counts in parts:
        for b, (calls, tokens) in counts.items():
            c, t = totals.get(b, (0, 0))
            totals[b] = (c + calls, t + tokens)
    return totals


def knot_weights(budget: float, knots: Sequence[float]) -> list[tuple[float, float]]:
    """How a budget between the dual's knots shares in them: linear (hat-function) weights of the two knots
    around it, the nearest end knot alone outside them (issue 31: λ(b) on knots, interpolated).

    By hand: knots [0.1, 0.2, 0.4]: b = 0.15 → [(0.1, 0.5), (0.2, 0.5)]; b = 0.25 → [(0.2, 0.75), (0.4, 0.25)];
    b = 0.2 → [(0.2, 1.0)]; b = 0.05 → [(0.1, 1.0)].
    """
    ordered = sorted(float(k) for k in knots)
    b = float(budget)
    for knot in ordered:
        if abs(knot - b) < 1e-6:
            return [(knot, 1.0)]
    if b < ordered[0]:
        return [(ordered[0], 1.0)]
    if b > ordered[-1]:
        return [(ordered[-1], 1.0)]
    for lo, hi in zip(ordered, ordered[1:], strict=False):
        if lo < b < hi:
            return [(lo, (hi - b) / (hi - lo)), (hi, (b - lo) / (hi - lo))]
    raise AssertionError("unreachable: b lies between two knots")


def pool_counts(counts: Counts, knots: Sequence[float]) -> dict[float, tuple[float, float]]:
    """One rollout's {budget: (calls, tokens)} at any budgets as {knot: (calls', tokens')} for the dual: each
    budget's **error** (its excess calls, calls − b·tokens) and its tokens are shared among the knots around
    it (:func:`knot_weights`), and a knot's calls' = knot·tokens' + its pooled excess, so that its fraction
    minus the knot is the token-weighted error of the budgets near it. A budget on a knot is counted as is.

    By hand: knots [0.1, 0.2], {0.15: (5, 20)} (error 5/20 − 0.15 = 0.1) → {0.1: (2.0, 10.0), 0.2: (3.0, 10.0)}:
    both knots see the error 0.1.
    """
    pooled: dict[float, tuple[float, float]] = {}  # on-knot budgets: their counts as they are (exact sums)
    excess: dict[float, float] = {}
    tokens_off: dict[float, float] = {}
    for b, (calls, tokens) in counts.items():
        weights = knot_weights(b, knots)
        if len(weights) == 1 and abs(weights[0][0] - float(b)) < 1e-6:
            c, t = pooled.get(weights[0][0], (0, 0))
            pooled[weights[0][0]] = (c + calls, t + tokens)
            continue
        for knot, weight in weights:
            excess[knot] = excess.get(knot, 0.0) + weight * (calls - float(b) * tokens)
            tokens_off[knot] = tokens_off.get(knot, 0.0) + weight * tokens
    for k, t_off in tokens_off.items():
        c, t = pooled.get(k, (0, 0))
        pooled[k] = (c + k * t_off + excess[k], t + t_off)
    return pooled


class BudgetDual:
    """λ per budget and the trailing window of teacher use that drives it."""

    def __init__(self, budgets: Sequence[float], lr: float = 1e-2, cap: float = 2.0, floor: float = 0.0,
                 window: int = 4) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 rollout, got {window}")
        if floor > cap:
            raise ValueError(f"the λ floor {floor} is above its cap {cap}")
        self.budgets = [float(b) for b in budgets]
        self.lr, self.cap, self.floor = lr, cap, floor
        self.lambdas: dict[float, float] = {b: 0.0 for b in self.budgets}
        self.history: deque[dict[float, tuple[float, float]]] = deque(maxlen=window)

    def key(self, budget: float) -> float:
        """The dual's own budget value nearest ``budget`` (budgets travel as float32 in observations)."""
        return min(self.budgets, key=lambda b: abs(b - float(budget)))

    def record(self, counts: Counts) -> None:
        """Add one rollout's {budget: (calls, tokens)} to the trailing window (budgets off the dual's own
        are pooled into them: :func:`pool_counts`)."""
        self.history.append(pool_counts(counts, self.budgets))

    @property
    def fractions(self) -> dict[float, float]:
        """The trailing token-level teacher fraction per budget (budgets without tokens are absent)."""
        return trailing_fractions(self.history)

    def step(self) -> dict[float, float]:
        """One projected dual step from the trailing fractions; returns the new λs. (A knot's fraction pooled
        from budgets around it, knot + their error, can reach past [0, 1] at the end knots; it is clamped.)"""
        fractions = {b: min(max(f, 0.0), 1.0) for b, f in self.fractions.items()}
        self.lambdas = lagrange_step(self.lambdas, fractions, lr=self.lr, cap=self.cap, floor=self.floor)
        return self.lambdas

    def state_dict(self) -> dict[str, Any]:
        return {"lambdas": [[b, v] for b, v in self.lambdas.items()],
                "history": [[[b, list(v)] for b, v in h.items()] for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "history" not in state:
            raise ValueError("this checkpoint's dual is the PID rule's (no 'history'); resume it with lagrange_rule='pid'")
        self.lambdas = {float(b): float(v) for b, v in state["lambdas"]}
        self.history.clear()
        for h in state["history"]:
            self.history.append({float(b): (int(v[0]), int(v[1])) for b, v in h})


# ------------------------------------------------------------------------------ the PID dual
#
# Why: the integral rule above is a pure integrator driven by a noisy measurement (a few rollouts per
# budget) through a lagging plant (the policy answers λ only after some updates), and it overshoots and
# oscillates (Stooke, Achiam & Abbeel 2020, "Responsive Safety in RL by PID Lagrangian Methods").
# A proportional term answers the error at once, so the integral can be small; smoothing the measured
# fraction keeps the proportional term from passing rollout noise straight into λ; a derivative term
# on the smoothed fraction damps its rises (and falls, when b is a target); and the integral stops
# growing while λ is held at the cap or the floor (anti-windup), so that it does not have to unwind.


@dataclass(frozen=True)
class PIDGains:
    """Gains of the PID dual: λ = clip(kp·e + I + kd·ḟ, floor, cap), I ← I + ki·e, e = f̄ − b."""

    kp: float = 0.5  # proportional gain on the smoothed error f̄ − b
    ki: float = 0.05  # integral gain (per dual step)
    kd: float = 0.0  # derivative gain on the change of the smoothed fraction f̄ per step
    smoothing: float = 0.3  # weight of the newest rollout in the exponential moving averages behind f̄ (1: none)

    def __post_init__(self) -> None:
        if min(self.kp, self.ki, self.kd) < 0:
            raise ValueError(f"PID gains must be >= 0, got kp={self.kp}, ki={self.ki}, kd={self.kd}")
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"smoothing must lie in (0, 1], got {self.smoothing}")


@dataclass(frozen=True)
class PIDState:
    """One budget's controller state: all that a resumed run needs to continue exactly."""

    integral: float = 0.0  # I: the integral term (already multiplied by ki)
    smoothed_calls: float = 0.0  # EMA of teacher calls per rollout
    smoothed_tokens: float = 0.0  # EMA of output tokens per rollout (0: nothing measured yet)
    previous_fraction: float | None = None  # f̄ at the previous step (the derivative's reference)

    @property
    def fraction(self) -> float | None:
        """The smoothed teacher fraction f̄ = EMA(calls) / EMA(tokens), or None before any tokens."""
        return self.smoothed_calls / self.smoothed_tokens if self.smoothed_tokens > 0 else None


def smooth_counts(state: PIDState, calls: float, tokens: float, smoothing: float) -> PIDState:
    """Fold one rollout's (calls, tokens) into the moving averages (the first rollout is taken as is).

    Averaging counts rather than per-rollout fractions weighs each rollout by its tokens, as the
    trailing window of the integral rule does."""
    if tokens <= 0:
        return state
    if state.smoothed_tokens == 0:
        return replace(state, smoothed_calls=float(calls), smoothed_tokens=float(tokens))
    keep = 1.0 - smoothing
    return replace(state, smoothed_calls=keep * state.smoothed_calls + smoothing * calls,
                   smoothed_tokens=keep * state.smoothed_tokens + smoothing * tokens)


def pid_lagrange_step(
    state: PIDState, budget: float, gains: PIDGains, cap: float, floor: float
) -> tuple[float | None, PIDState]:
    """One PID step of λ_b from the smoothed fraction in ``state`` (after :func:`smooth_counts`).

    Returns the new λ_b (None when nothing has been measured yet: λ keeps its value) and the new state.

    - error e = f̄ − b (over-use raises λ, which makes calls costlier in Eq. 17);
    - derivative ḟ = f̄ − f̄_prev, counted only when it rises if b is a ceiling (floor ≥ 0: a falling
      fraction is no reason to ease off, as in Stooke et al.), both ways if b is a target (floor < 0);
    - integral I ← clip(I + ki·e, floor, cap), held where it would push λ further past a bound it
      is already beyond (conditional-integration anti-windup);
    - λ = clip(kp·e + I + kd·ḟ, floor, cap).
    """
    if floor > cap:
        raise ValueError(f"the λ floor {floor} is above its cap {cap}")
    fraction = state.fraction
    if fraction is None:
        return None, state
    error = fraction - budget
    change = 0.0 if state.previous_fraction is None else fraction - state.previous_fraction
    if floor >= 0:
        change = max(change, 0.0)
    fixed = gains.kp * error + gains.kd * change
    integral = min(max(state.integral + gains.ki * error, floor), cap)
    if (fixed + integral > cap and error > 0) or (fixed + integral < floor and error < 0):
        integral = state.integral  # saturated and the error pushes further out: do not wind up
    lam = min(max(fixed + integral, floor), cap)
    return lam, replace(state, integral=integral, previous_fraction=fraction)


class PIDBudgetDual(BudgetDual):
    """λ per budget from a PID controller on the smoothed teacher fraction (:func:`pid_lagrange_step`).

    The same interface as :class:`BudgetDual` (``record`` one rollout's counts, ``step``, ``lambdas``,
    ``fractions``, ``state_dict``); ``window`` is not used: the smoothing is the moving average."""

    def __init__(self, budgets: Sequence[float], gains: PIDGains, cap: float = 2.0, floor: float = 0.0) -> None:
        super().__init__(budgets, lr=gains.ki, cap=cap, floor=floor, window=1)
        self.gains = gains
        self.states: dict[float, PIDState] = {b: PIDState() for b in self.budgets}

    def record(self, counts: Counts) -> None:
        for key, (calls, tokens) in pool_counts(counts, self.budgets).items():
            self.states[key] = smooth_counts(self.states[key], calls, tokens, self.gains.smoothing)

    @property
    def fractions(self) -> dict[float, float]:
        """The smoothed teacher fraction f̄ per budget (budgets without tokens yet are absent)."""
        return {b: f for b, s in self.states.items() if (f := s.fraction) is not None}

    def step(self) -> dict[float, float]:
        lambdas = dict(self.lambdas)
        for b in self.budgets:
            lam, self.states[b] = pid_lagrange_step(self.states[b], b, self.gains, self.cap, self.floor)
            if lam is not None:
                lambdas[b] = lam
        self.lambdas = lambdas
        return self.lambdas

    def state_dict(self) -> dict[str, Any]:
        return {"lambdas": [[b, v] for b, v in self.lambdas.items()],
                "pid": [[b, asdict(s)] for b, s in self.states.items()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "pid" not in state:
            raise ValueError("this checkpoint's dual is the integral rule's (no 'pid' state); resume it with "
                             "lagrange_rule='integral', or start phase 2 afresh with the PID dual")
        self.lambdas = {float(b): float(v) for b, v in state["lambdas"]}
        self.states = {float(b): PIDState(**s) for b, s in state["pid"]}


LAGRANGE_RULES = ("integral", "pid")


def make_dual(budgets: Sequence[float], rule: str = "integral", lr: float = 1e-2, cap: float = 2.0,
              floor: float = 0.0, window: int = 4, gains: PIDGains | None = None) -> BudgetDual:
    """The dual a trainer's config asks for: ``"integral"`` (the paper's projected step on the trailing
    ``window`` rollouts, step size ``lr``) or ``"pid"`` (:class:`PIDBudgetDual` with ``gains``)."""
    if rule == "integral":
        return BudgetDual(budgets, lr=lr, cap=cap, floor=floor, window=window)
    if rule == "pid":
        return PIDBudgetDual(budgets, gains or PIDGains(), cap=cap, floor=floor)
    raise ValueError(f"lagrange_rule must be one of {list(LAGRANGE_RULES)}, got {rule!r}")
