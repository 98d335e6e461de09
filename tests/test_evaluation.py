"""Checkpoint selection's rules (§3.3): the budget check follows the Lagrangian, the sample is random."""

from __future__ import annotations

import pytest

from agents.evaluation import (
    BudgetResult,
    budget_violation,
    budgets_are_ceilings,
    meets_budgets,
    seeded_subset,
    worst_violation,
)


def results(*pairs: tuple[float, float]) -> list[BudgetResult]:
    return [BudgetResult(budget=b, teacher_fraction=f, quality=0.0, examples=10) for b, f in pairs]


def test_a_ceiling_allows_less_teacher_use_and_a_target_does_not():
    under = results((0.0, 0.0), (0.3, 0.15), (0.5, 0.51))  # b = 0.3 far under, b = 0.5 0.01 over
    assert meets_budgets(under, 0.02, ceiling=True)
    assert not meets_budgets(under, 0.02, ceiling=False)
    assert worst_violation(under, ceiling=True) == pytest.approx(0.01)
    assert worst_violation(under, ceiling=False) == pytest.approx(0.15)
    over = results((0.1, 0.125))
    assert not meets_budgets(over, 0.02, ceiling=True) and not meets_budgets(over, 0.02, ceiling=False)


def test_budget_violation_by_hand():
    assert budget_violation(0.35, 0.3, ceiling=True) == pytest.approx(0.05)
    assert budget_violation(0.25, 0.3, ceiling=True) == 0.0
    assert budget_violation(0.25, 0.3, ceiling=False) == pytest.approx(0.05)


def test_the_lagrange_floor_decides_the_rule():
    assert budgets_are_ceilings(0.0) and budgets_are_ceilings(0.5)
    assert not budgets_are_ceilings(-4.0)


def test_the_selection_sample_is_seeded_random_and_in_order():
    examples = list(range(2000))
    a, b = seeded_subset(examples, 512, seed=0), seeded_subset(examples, 512, seed=0)
    assert a == b and len(a) == 512 and len(set(a)) == 512
    assert a == sorted(a) and a != examples[:512] and max(a) > 1500
    assert seeded_subset(examples, 512, seed=1) != a
    assert seeded_subset(examples[:100], 512, seed=0) == examples[:100]  # fewer than asked: all of them
