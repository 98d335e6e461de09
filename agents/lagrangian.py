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
from typing import Any

from agents.objectives import lagrange_step

Counts = Mapping[float, tuple[int, int]]  # {budget: (teacher calls, output tokens)} of one rollout


def trailing_fractions(history: Iterable[Counts]) -> dict[float, float]:
    """Token-level teacher fraction per budget over the rollouts in ``history``."""
    return {b: calls / tokens for b, (calls, tokens) in merge_counts(history).items() if tokens > 0}


def merge_counts(parts: Iterable[Counts]) -> dict[float, tuple[int, int]]:
    """{budget: (calls, tokens)} summed over several rollouts (e.g. one per data-parallel rank)."""
    totals: dict[float, tuple[int, int]] = {}
    for counts in parts:
        for b, (calls, tokens) in counts.items():
            c, t = totals.get(b, (0, 0))
            totals[b] = (c + int(calls), t + int(tokens))
    return totals


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
        self.history: deque[dict[float, tuple[int, int]]] = deque(maxlen=window)

    def key(self, budget: float) -> float:
        """The dual's own budget value nearest ``budget`` (budgets travel as float32 in observations)."""
        return min(self.budgets, key=lambda b: abs(b - float(budget)))

    def record(self, counts: Counts) -> None:
        """Add one rollout's {budget: (calls, tokens)} to the trailing window."""
        self.history.append({self.key(b): (int(c), int(t)) for b, (c, t) in counts.items()})

    @property
    def fractions(self) -> dict[float, float]:
        """The trailing token-level teacher fraction per budget (budgets without tokens are absent)."""
        return trailing_fractions(self.history)

    def step(self) -> dict[float, float]:
        """One projected dual step from the trailing fractions; returns the new λs."""
        self.lambdas = lagrange_step(self.lambdas, self.fractions, lr=self.lr, cap=self.cap, floor=self.floor)
        return self.lambdas

    def state_dict(self) -> dict[str, Any]:
        return {"lambdas": [[b, v] for b, v in self.lambdas.items()],
                "history": [[[b, list(v)] for b, v in h.items()] for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.lambdas = {float(b): float(v) for b, v in state["lambdas"]}
        self.history.clear()
        for h in state["history"]:
            self.history.append({float(b): (int(v[0]), int(v[1])) for b, v in h})
