"""Eq. 17 (with §2.4.2's normalisation and clipping) and its running normalisers, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from tw_env.rewards import REWARD_CLIP, RunningRewardStats, budget_cost, eq17_reward


def test_student_token_reward_by_hand():
    # (log p − μ)/σ + λ·b = (−1.5 + 0.5)/2 + 0.8·0.3 = −0.5 + 0.24
    r = eq17_reward(-1.5, False, budget=0.3, lagrange=0.8, mu=-0.5, sigma=2.0)
    assert float(r) == pytest.approx(-0.26, abs=1e-12)
    # without normalisation and λ = 0 it is the teacher log-likelihood itself
    assert float(eq17_reward(-0.7, False, 0.1, 0.0)) == pytest.approx(-0.7, abs=1e-12)


def test_teacher_call_reward_is_lambda_times_b_minus_one_whatever_the_likelihood():
    for lp in (-100.0, -0.3, 0.0):
        r = eq17_reward(lp, True, budget=0.3, lagrange=0.8, mu=-0.5, sigma=2.0)
        assert float(r) == pytest.approx(0.8 * (0.3 - 1.0), abs=1e-12)  # −0.56
    assert float(eq17_reward(-5.0, True, budget=0.5, lagrange=0.0)) == 0.0  # λ = 0: teacher tokens are free


def test_reward_is_clipped_to_plus_minus_two():
    assert REWARD_CLIP == 2.0
    assert float(eq17_reward(-10.0, False, 0.0, 0.0)) == -2.0
    assert float(eq17_reward(-0.1, False, 0.0, 0.0, mu=-3.0, sigma=0.5)) == 2.0  # 5.8 before clipping
    assert float(eq17_reward(0.0, True, 0.0, 5.0)) == -2.0  # −5 before clipping
    assert float(eq17_reward(-1.9, False, 0.0, 0.0)) == pytest.approx(-1.9)  # inside: untouched
    assert float(eq17_reward(-10.0, False, 0.0, 0.0, clip=3.0)) == -3.0


def test_arrays_elementwise():
    lp = np.array([-1.0, -2.0, -0.5, -4.0])
    calls = np.array([False, True, False, True])
    budget = np.array([0.1, 0.2, 0.3, 0.5])
    lam = np.array([1.0, 1.5, 0.5, 2.0])
    r = eq17_reward(lp, calls, budget, lam, mu=-1.0, sigma=0.5)
    expected = [
        (-1.0 + 1.0) / 0.5 + 1.0 * 0.1,
        1.5 * (0.2 - 1),
        (-0.5 + 1.0) / 0.5 + 0.5 * 0.3,
        2.0 * (0.5 - 1),
    ]
    assert r.shape == (4,)
    np.testing.assert_allclose(r, expected, atol=1e-12)
    # a scalar budget and λ broadcast over the tokens
    np.testing.assert_allclose(eq17_reward(lp, calls, 0.2, 1.0), [-0.8, -0.8, -0.3, -0.8], atol=1e-12)


def test_budget_cost_sums_to_zero_exactly_when_the_teacher_fraction_equals_the_budget():
    b = 0.3
    for calls in range(11):  # 10-token episodes with 0..10 teacher calls
        is_call = np.arange(10) < calls
        total = budget_cost(is_call, b).sum()
        assert total == pytest.approx(calls - 10 * b, abs=1e-12)
        assert (abs(total) < 1e-12) == (calls == 3)
    # and so does the budget part of Eq. 17 (λ·b per student token, λ·(b−1) per call): −λ·Σc
    lam = 1.3
    is_call = np.array([0, 1, 0, 0, 1, 0, 0, 1, 0, 0], dtype=bool)
    rewards = eq17_reward(np.zeros(10), is_call, b, lam)
    assert rewards.sum() == pytest.approx(0.0, abs=1e-12)
    over = np.array([1, 1, 0, 0, 1, 0, 0, 1, 0, 0], dtype=bool)  # fraction 0.4 > b: net penalty −λ·(0.4−b)·10
    assert eq17_reward(np.zeros(10), over, b, lam).sum() == pytest.approx(-lam * 1.0, abs=1e-12)
    # Eq. 18's −1{not τ}·b would balance at b/(1+b) instead: make sure that is not what is used
    assert budget_cost(False, b) == pytest.approx(-b)
    assert budget_cost(True, b) == pytest.approx(1 - b)


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_invalid_sigma_raises(sigma):
    with pytest.raises(ValueError, match="sigma must be positive"):
        eq17_reward(-1.0, False, 0.1, 1.0, mu=0.0, sigma=sigma)


def test_running_stats_identity_until_min_count():
    stats = RunningRewardStats(window=100, min_count=4)
    assert (stats.mu, stats.sigma) == (0.0, 1.0)
    stats.update([-1.0, -2.0, -3.0], [-1.0, -3.0, -5.0])
    assert (stats.mu, stats.sigma) == (0.0, 1.0)  # 3 < 4 values each
    stats.update([-6.0], [])
    assert stats.mu == pytest.approx(-3.0)  # teacher tokens: 4 values now
    assert stats.sigma == 1.0  # student tokens: still 3
    stats.update([], [-7.0])
    # σ_r is the (population) std of the student-token log-likelihoods
    assert stats.sigma == pytest.approx(float(np.std([-1.0, -3.0, -5.0, -7.0])))
    assert stats.sigma == pytest.approx(np.sqrt(5.0))


def test_running_stats_window_min_sigma_and_reset():
    stats = RunningRewardStats(window=4, min_count=2, min_sigma=0.05)
    stats.update([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [-2.0, -2.0, -2.0])
    assert stats.mu == pytest.approx(4.5)  # only the last 4 teacher values
    assert stats.sigma == pytest.approx(0.05)  # constant student values: the floor
    stats.update([], [0.0, -4.0, 0.0, -4.0])
    assert stats.sigma == pytest.approx(2.0)  # window of the last 4 student values
    stats.reset()
    assert (stats.mu, stats.sigma) == (0.0, 1.0)


def test_running_stats_state_dict_round_trip():
    rng = np.random.default_rng(0)
    a = RunningRewardStats(window=8, min_count=3)
    a.update(rng.normal(size=11), rng.normal(size=6))
    b = RunningRewardStats(window=8, min_count=3)
    b.load_state_dict(a.state_dict())
    assert (b.mu, b.sigma) == (a.mu, a.sigma)
    assert b.state_dict() == a.state_dict()
    more_t, more_s = rng.normal(size=5), rng.normal(size=5)
    a.update(more_t, more_s)
    b.update(more_t, more_s)
    assert (b.mu, b.sigma) == (a.mu, a.sigma)  # the window survives the round trip
    assert len(b.state_dict()["teacher"]) == 8


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"min_count": 0}])
def test_running_stats_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError, match=">= 1"):
        RunningRewardStats(**kwargs)
