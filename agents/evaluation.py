"""Quality and teacher use of a trained student at each budget, with greedy teacher-help decoding."""

from __future__ import annotations

from collections.abc import Sequence
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
