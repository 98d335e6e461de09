"""Quality and teacher use of a trained student at each budget (greedy teacher-help decoding), the
confidence fallback's threshold calibration, and the latency cost model of `tw eval` / `tw plot`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from agents.distributed import SINGLE, Distributed, all_gather_objects, shard
from agents.policy import StudentPolicy
from tw_env.metrics import quality
from tw_env.task import Task
from tw_env.tasks import Example

T = TypeVar("T")


@dataclass
class BudgetResult:
    budget: float
    teacher_fraction: float  # calls / output tokens over the whole set (token level)
    quality: float
    examples: int


def evaluate_budgets(
    policy: StudentPolicy, task: Task, examples: Sequence[Example], budgets: Sequence[float], max_new_tokens: int,
    batch_size: int = 64, dist: Distributed = SINGLE,
) -> list[BudgetResult]:
    """Decode every example at every budget (greedy over V + 1, teacher on call) and score it.

    Under data parallelism each rank decodes its shard of ``examples`` and the hypotheses are
    gathered in order, so every rank scores the whole set and returns the same results.
    """
    from agents.decoding import decode_text, teacher_help_decode

    results: list[BudgetResult] = []
    was_training = policy.training
    policy.eval()
    local_examples = shard(examples, dist)
    for budget in budgets:
        hypotheses: list[str] = []
        calls = tokens = 0
        for start in range(0, len(local_examples), batch_size):
            chunk = local_examples[start : start + batch_size]
            sources, chunk_budgets = [e.source for e in chunk], [budget] * len(chunk)
            ids, mask = task.prompts(sources, chunk_budgets, policy.device)
            teacher_ids, teacher_mask = task.teacher_prompts(sources, chunk_budgets, policy.device)
            with torch.no_grad():
                result = teacher_help_decode(policy, task.teacher, ids, mask, max_new_tokens,
                                             teacher_input_ids=teacher_ids, teacher_attention_mask=teacher_mask)
            calls += sum(result.teacher_calls)
            tokens += sum(len(o) for o in result.output_ids)
            hypotheses += decode_text(result, task.tokenizer)
        parts = all_gather_objects((hypotheses, calls, tokens), dist)
        hypotheses = [h for part, _, _ in parts for h in part]
        calls, tokens = sum(p[1] for p in parts), sum(p[2] for p in parts)
        score = quality(task.metric, hypotheses, [e.reference for e in examples])
        results.append(BudgetResult(float(budget), calls / max(tokens, 1), score, len(examples)))
    policy.train(was_training)
    return results


def seeded_subset(examples: Sequence[T], count: int, seed: int) -> list[T]:
    """``count`` examples drawn at random without replacement (seeded), kept in their original order.

    The paper selects checkpoints on 512 validation examples sampled at random (§3.3); the first
    512 of a file are often one source or one length band.
    """
    chosen = np.random.default_rng([seed, 1]).permutation(len(examples))[:count]
    return [examples[i] for i in sorted(chosen)]


def budget_violation(teacher_fraction: float, budget: float, ceiling: bool) -> float:
    """How far a teacher fraction breaks its budget: f − b above a ceiling (0 below it), |f − b| for a target.

    Which one applies follows the Lagrangian (§3.3 keeps checkpoints that satisfy the constraint
    within δ): with λ ≥ 0 (``lagrange_floor`` ≥ 0, the paper) b is a ceiling and using less teacher
    is allowed; with a negative floor λ also pays for calls and b is a target.
    """
    excess = teacher_fraction - budget
    return max(excess, 0.0) if ceiling else abs(excess)


def budgets_are_ceilings(lagrange_floor: float) -> bool:
    """λ ≥ 0 treats every budget as a ceiling; a floor below 0 makes them targets."""
    return lagrange_floor >= 0


def worst_violation(results: list[BudgetResult], ceiling: bool) -> float:
    return max(budget_violation(r.teacher_fraction, r.budget, ceiling) for r in results)


def meets_budgets(results: list[BudgetResult], delta: float, ceiling: bool) -> bool:
    """Every budget satisfied within δ: f ≤ b + δ for ceilings, |f − b| ≤ δ for targets."""
    return worst_violation(results, ceiling) <= delta


def mean_quality(results: list[BudgetResult]) -> float:
    return sum(r.quality for r in results) / len(results)


def selection_record(results: list[BudgetResult], delta: float, ceiling: bool) -> dict:
    """What the selection rule compares: whether every budget is met within δ, the worst violation
    and the mean quality (plus the per-budget results)."""
    return {
        "meets_budgets": meets_budgets(results, delta, ceiling), "worst_violation": worst_violation(results, ceiling),
        "mean_quality": mean_quality(results), "budget_rule": "ceiling" if ceiling else "target",
        "results": [dataclasses.asdict(r) for r in results],
    }


def is_better_selection(candidate: dict, best: dict | None) -> bool:
    """The §3.3 rule between two :func:`selection_record` s: meeting every budget within δ beats not
    meeting them; among those that meet them the best mean quality wins, among those that do not the
    smallest worst violation (so there is always a usable choice). Ties keep ``best``."""
    if best is None:
        return True
    if candidate["meets_budgets"] != best["meets_budgets"]:
        return bool(candidate["meets_budgets"])
    if candidate["meets_budgets"]:
        return candidate["mean_quality"] > best["mean_quality"]
    return candidate["worst_violation"] < best["worst_violation"]


# ---------------------------------------------------------------------------------------------- calibration
@dataclass
class Calibration:
    """A confidence threshold found for a target teacher fraction, and every threshold tried."""

    target: float
    threshold: float
    teacher_fraction: float  # at ``threshold``, on the calibration examples
    tried: list[tuple[float, float]]  # (threshold, teacher fraction), in the order measured


def calibrate_threshold(
    teacher_fraction_at: Callable[[float], float], target: float, tolerance: float = 0.005, iterations: int = 14,
    lowest: float = 1e-6,
) -> Calibration:
    """The confidence-fallback threshold whose teacher fraction is closest to ``target``.

    Co-LLM and Big Little Decoder compare at matched teacher use by calibrating the deferral
    threshold per fraction on validation data; this does it by bisection. The fraction grows with
    the threshold (more tokens fall below it), and the student's top probability spans orders of
    magnitude (it can be under 0.01 on a tenth of the tokens), so the search bisects log10(t) over
    [``lowest``, 1]. Target 0 is threshold 0, which never falls back. Stops once within ``tolerance``
    of the target; returns the closest threshold seen otherwise.
    """
    _check_search(target, tolerance, iterations)
    if not 0.0 < lowest < 1.0:
        raise ValueError(f"need 0 < lowest < 1, got {lowest}")
    if target == 0.0:
        never = float(teacher_fraction_at(0.0))
        return Calibration(target, 0.0, never, [(0.0, never)])
    tried = _bisect_to_target(lambda x: (10.0 ** x, teacher_fraction_at(10.0 ** x)), target,
                              math.log10(lowest), 0.0, tolerance, iterations)
    return _closest(target, tried)


def calibrate_call_threshold(
    teacher_fraction_at: Callable[[float], float], target: float, tolerance: float = 0.005, iterations: int = 14,
    widest_logit: float = 12.0,
) -> Calibration:
    """The Training Wheels call threshold c (call iff π(<τ>) > c) whose teacher fraction is closest to ``target``.

    Beyond the paper: where the learnt call rate of a budget misses it (the Lagrangian still
    oscillates), the same per-budget calibration on validation data that the confidence fallback
    gets moves teacher use onto the budget while keeping the policy's own ranking of which tokens
    to ask for. The fraction falls as c rises; π(<τ>) is spread in log-odds, so the search bisects
    −logit(c) over [−``widest_logit``, ``widest_logit``], starting from the policy's own c = ½
    (kept if it is already within ``tolerance``).
    """
    _check_search(target, tolerance, iterations)
    if widest_logit <= 0:
        raise ValueError(f"widest_logit must be > 0, got {widest_logit}")

    def threshold(x: float) -> float:  # x = −logit(c): the fraction grows with x
        return 1.0 / (1.0 + math.exp(x))

    def measure(x: float) -> tuple[float, float]:
        return threshold(x), teacher_fraction_at(threshold(x))

    first = measure(0.0)
    tried = [(first[0], float(first[1]))]
    if abs(tried[0][1] - target) > tolerance:
        tried += _bisect_to_target(measure, target, -widest_logit, widest_logit, tolerance, iterations)
    return _closest(target, tried)


def calibrate_kl_threshold(
    teacher_fraction_at: Callable[[float], float], target: float, tolerance: float = 0.005, iterations: int = 14,
    lowest: float = 1e-4, highest: float = 100.0,
) -> Calibration:
    """The KL threshold k (call iff KL(p ‖ π_V) > k, nats) of the online KL oracle whose teacher
    fraction is closest to ``target``: bisection in log10(k) over [``lowest``, ``highest``]. The
    fraction falls as k rises."""
    _check_search(target, tolerance, iterations)
    if not 0.0 < lowest < highest:
        raise ValueError(f"need 0 < lowest < highest, got {lowest}, {highest}")
    tried = _bisect_to_target(lambda x: (10.0 ** -x, teacher_fraction_at(10.0 ** -x)), target,
                              -math.log10(highest), -math.log10(lowest), tolerance, iterations)
    return _closest(target, tried)


def _check_search(target: float, tolerance: float, iterations: int) -> None:
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target teacher fraction must lie in [0, 1], got {target}")
    if iterations < 1 or tolerance < 0:
        raise ValueError(f"need iterations >= 1 and tolerance >= 0; got {iterations}, {tolerance}")


def _bisect_to_target(
    measure: Callable[[float], tuple[float, float]], target: float, low: float, high: float, tolerance: float,
    iterations: int,
) -> list[tuple[float, float]]:
    """Bisect x in [low, high] for a teacher fraction non-decreasing in x; ``measure(x)`` returns
    (threshold, fraction). The ends are measured first (high, then low): a target outside their
    range stops there. Returns every (threshold, fraction) measured, in order."""
    tried: list[tuple[float, float]] = []

    def fraction_at(x: float) -> float:
        threshold, fraction = measure(x)
        tried.append((threshold, float(fraction)))
        return float(fraction)

    for end in (high, low):
        fraction = fraction_at(end)
        if abs(fraction - target) <= tolerance or (end == high and fraction < target) or (end == low and fraction > target):
            return tried
    for _ in range(iterations):
        middle = (low + high) / 2
        fraction = fraction_at(middle)
        if abs(fraction - target) <= tolerance:
            break
        low, high = (middle, high) if fraction < target else (low, middle)
    return tried


def _closest(target: float, tried: list[tuple[float, float]]) -> Calibration:
    threshold, fraction = min(tried, key=lambda tf: (abs(tf[1] - target), tf[0]))
    return Calibration(target, threshold, fraction, tried)


# ---------------------------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class ForwardCosts:
    """What one decoder forward of each model costs, for projecting latency to other hardware.

    A forward is one incremental decoder step at batch size 1 (a catch-up or verification forward
    over several tokens is counted as one: on a GPU at batch size 1 such forwards cost about the
    same as one token's, since they are memory-bound; on a CPU they cost more, which the projection
    for CPU-measured costs leaves out)."""

    teacher_ms: float
    student_ms: float
    label: str  # where the costs come from, printed on every projected figure

    def __post_init__(self) -> None:
        if not (self.teacher_ms > 0 and self.student_ms > 0):
            raise ValueError(f"per-forward costs must be positive, got teacher {self.teacher_ms} ms, "
                             f"student {self.student_ms} ms")

    def describe(self) -> str:
        return f"{self.label}: teacher {self.teacher_ms:.3g} ms, student {self.student_ms:.3g} ms per forward"


def given_forward_costs(teacher_ms: float | None, student_ms: float | None, label: str) -> ForwardCosts | None:
    """The cost model a user gave (`tw eval`/`tw plot` flags): both costs or neither (None)."""
    if (teacher_ms is None) != (student_ms is None) or any(c is not None and c <= 0 for c in (teacher_ms, student_ms)):
        raise ValueError(f"teacher_forward_ms and student_forward_ms are given together and positive, "
                         f"got {[teacher_ms, student_ms]}")
    if teacher_ms is None or student_ms is None:
        return None
    return ForwardCosts(teacher_ms, student_ms, label or "given")


def projected_latency_ms(teacher_forwards: float, student_forwards: float, costs: ForwardCosts) -> float:
    """Latency of one example under the cost model: forwards of each model times its cost."""
    return teacher_forwards * costs.teacher_ms + student_forwards * costs.student_ms


def with_projected_latency(rows: Sequence[dict], costs: ForwardCosts | None) -> list[dict]:
    """Copies of result rows with ``projected_latency_ms`` (NaN where the forwards or costs are unknown)."""
    def known(value: object) -> float | None:
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    projected = []
    for row in rows:
        t, s = known(row.get("teacher_forwards_per_example")), known(row.get("student_forwards_per_example"))
        value = projected_latency_ms(t, s, costs) if costs is not None and t is not None and s is not None else math.nan
        projected.append({**row, "projected_latency_ms": value})
    return projected


def costs_measured_here(rows: Sequence[dict], label: str = "measured here") -> ForwardCosts | None:
    """Per-forward costs from the teacher-alone and student-alone rows of a `tw eval` run: each
    one's median latency over its forwards per example (None if either row or value is missing)."""
    def per_forward(method: str, forwards_key: str) -> float | None:
        for row in rows:
            latency, forwards = row.get("latency_ms_median"), row.get(forwards_key)
            if row.get("method") == method and latency is not None and forwards:
                value = float(latency) / float(forwards)
                return value if math.isfinite(value) and value > 0 else None
        return None

    teacher_ms = per_forward("teacher", "teacher_forwards_per_example")
    student_ms = per_forward("student", "student_forwards_per_example")
    if teacher_ms is None or student_ms is None:
        return None
    return ForwardCosts(teacher_ms, student_ms, label)
