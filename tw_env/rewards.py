"""The Eq. 17 reward as pure functions, and the running statistics that normalise it (§2.4.2).

Eq. 17, for the episode's budget b and its Lagrange multiplier λ_b:

    r_i = (log p(x_i) − μ_r) / σ_r + λ_b·b     if the student emitted x_i itself
    r_i = λ_b·(b − 1)                           if it called the teacher (<τ>)

clipped to [−2, 2]. The budget part equals −λ_b·c_i with a per-token cost c_i = 1{<τ>} − b, which
sums to zero exactly when the teacher fraction equals b (notes.md item 3: follow Eq. 17, not Eq. 18).
Teacher tokens get no log-likelihood part: they are "implicitly correct" (notes.md item 5).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

REWARD_CLIP = 2.0


def budget_cost(is_call: np.ndarray | bool, budget: np.ndarray | float) -> np.ndarray:
    """Per-token constraint cost c = 1{<τ>} − b; its episode mean is (teacher fraction − b)."""
    return np.asarray(is_call, dtype=np.float64) - np.asarray(budget, dtype=np.float64)


def eq17_reward(
    teacher_logprob: np.ndarray | float,
    is_call: np.ndarray | bool,
    budget: np.ndarray | float,
    lagrange: np.ndarray | float,
    mu: float = 0.0,
    sigma: float = 1.0,
    clip: float = REWARD_CLIP,
) -> np.ndarray:
    """Eq. 17 with §2.4.2's normalisation and clipping, elementwise over arrays.

    Args:
        teacher_logprob: natural-log teacher probability of the emitted token (ignored for calls).
        is_call: whether the step was the <τ> action.
        budget: the episode's teacher-use budget b.
        lagrange: λ_b for that budget.
        mu, sigma: the running normalisers μ_r and σ_r of the log-likelihood part.
        clip: the total reward is clipped to [−clip, clip].
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    is_call = np.asarray(is_call, dtype=bool)
    likelihood = (np.asarray(teacher_logprob, dtype=np.float64) - mu) / sigma
    budget_part = -np.asarray(lagrange, dtype=np.float64) * budget_cost(is_call, budget)
    reward = np.where(is_call, 0.0, likelihood) + budget_part
    return np.clip(reward, -clip, clip)


class RunningRewardStats:
    """μ_r and σ_r of §2.4.2, over a window of recent tokens.

    μ_r is the mean teacher log-likelihood of *teacher* tokens. We take the teacher's own token (the
    one a call would produce) at every step, not only at calls: it is known at every step for free,
    so μ_r stays defined under the "no teacher use" budget. σ_r is the standard deviation of the
    teacher log-likelihood of *student* tokens. Until ``min_count`` values are seen the identity
    normalisation (μ=0, σ=1) is used, so the first episodes are well defined.
    """

    def __init__(self, window: int = 4096, min_count: int = 16, min_sigma: float = 1e-2) -> None:
        if window < 1 or min_count < 1:
            raise ValueError(f"window and min_count must be >= 1, got {window} and {min_count}")
        self.window = window
        self.min_count = min_count
        self.min_sigma = min_sigma
        self._teacher: deque[float] = deque(maxlen=window)
        self._student: deque[float] = deque(maxlen=window)
        self._mu, self._sigma = 0.0, 1.0
        self._added = [0, 0]  # values ever added (teacher, student): what :meth:`added_since` counts from

    def update(self, teacher_token_logprobs: Iterable[float], student_token_logprobs: Iterable[float]) -> None:
        """Add one episode's teacher log-likelihoods of teacher and of student tokens; refreshes μ_r, σ_r."""
        teacher, student = [float(x) for x in teacher_token_logprobs], [float(x) for x in student_token_logprobs]
        self._teacher.extend(teacher)
        self._student.extend(student)
        self._added[0] += len(teacher)
        self._added[1] += len(student)
        self._refresh()

    def mark(self) -> dict[str, Any]:
        """A snapshot to rewind to, and to count new values from (:meth:`added_since`)."""
        return {"state": self.state_dict(), "added": list(self._added)}

    def added_since(self, mark: Mapping[str, Any]) -> tuple[list[float], list[float]]:
        """The (teacher, student) values added since ``mark``, the last ``window`` of each at most.

        Data-parallel training merges every rank's new values into one window
        (``agents.distributed.merge_reward_stats``); older values would have left it anyway.
        """
        new = [min(now - then, self.window) for now, then in zip(self._added, mark["added"], strict=True)]
        teacher = list(self._teacher)[len(self._teacher) - new[0]:] if new[0] else []
        student = list(self._student)[len(self._student) - new[1]:] if new[1] else []
        return teacher, student

    def _refresh(self) -> None:
        # Computed here, once per episode, because every env step reads them.
        self._mu = float(np.mean(self._teacher)) if len(self._teacher) >= self.min_count else 0.0
        self._sigma = (
            max(float(np.std(self._student)), self.min_sigma) if len(self._student) >= self.min_count else 1.0
        )

    @property
    def mu(self) -> float:
        return self._mu

    @property
    def sigma(self) -> float:
        return self._sigma

    def reset(self) -> None:
        self._teacher.clear()
        self._student.clear()
        self._refresh()

    def state_dict(self) -> dict[str, list[float]]:
        """The remembered values (``teacher``, ``student``), for a checkpoint."""
        return {"teacher": list(self._teacher), "student": list(self._student)}

    def load_state_dict(self, state: Mapping[str, Iterable[float]]) -> None:
        """Restore :meth:`state_dict`'s values (the last ``window`` of each are kept)."""
        self._teacher = deque(state["teacher"], maxlen=self.window)
        self._student = deque(state["student"], maxlen=self.window)
        self._refresh()


def interpolate_multiplier(budget: float, multipliers: Mapping[float, float]) -> float:
    """λ(b) for any budget from the multipliers of known budgets (the knots): linear between the two knots
    around b, the nearest knot's λ outside them (issue 31: a budget between the trained ones).

    By hand: knots {0.1: 1.0, 0.2: 3.0}: b = 0.15 → 2.0, b = 0.125 → 1.5, b = 0.05 → 1.0, b = 0.3 → 3.0.
    """
    if not multipliers:
        raise ValueError("no known budgets to interpolate λ from; expected at least one {budget: λ}")
    knots = sorted((float(k), float(v)) for k, v in multipliers.items())
    b = float(budget)
    if b <= knots[0][0]:
        return knots[0][1]
    if b >= knots[-1][0]:
        return knots[-1][1]
    for (lo, lam_lo), (hi, lam_hi) in zip(knots, knots[1:], strict=False):
        if lo <= b <= hi:
            return lam_lo + (lam_hi - lam_lo) * (b - lo) / (hi - lo)
    raise AssertionError("unreachable: b lies between the first and last knot")
