"""The PID dual (agents/lagrangian.py) against hand computations, and its state across a resume."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest

from agents.lagrangian import PIDBudgetDual, PIDGains, PIDState, pid_lagrange_step, smooth_counts


def test_smooth_counts_takes_the_first_rollout_then_averages_counts():
    state = smooth_counts(PIDState(), calls=10, tokens=100, smoothing=0.25)
    assert (state.smoothed_calls, state.smoothed_tokens) == (10.0, 100.0)
    state = smooth_counts(state, calls=50, tokens=200, smoothing=0.25)
    # 0.75·10 + 0.25·50 = 20 calls, 0.75·100 + 0.25·200 = 125 tokens: f̄ = 0.16 (token-weighted)
    assert state.smoothed_calls == pytest.approx(20.0) and state.smoothed_tokens == pytest.approx(125.0)
    assert state.fraction == pytest.approx(0.16)
    assert smooth_counts(state, calls=0, tokens=0, smoothing=0.25) == state  # no tokens: nothing measured


def test_pid_step_by_hand():
    gains = PIDGains(kp=2.0, ki=0.5, kd=3.0, smoothing=1.0)
    state = PIDState(integral=0.1, smoothed_calls=40.0, smoothed_tokens=100.0, previous_fraction=0.35)
    lam, new = pid_lagrange_step(state, budget=0.3, gains=gains, cap=4.0, floor=-4.0)
    # e = 0.4 − 0.3 = 0.1; I = 0.1 + 0.5·0.1 = 0.15; ḟ = 0.4 − 0.35 = 0.05 (two-sided: floor < 0)
    # λ = 2·0.1 + 0.15 + 3·0.05 = 0.5
    assert lam == pytest.approx(0.5)
    assert new.integral == pytest.approx(0.15) and new.previous_fraction == pytest.approx(0.4)
    assert state.integral == 0.1  # pure: the input state is unchanged


def test_pid_derivative_counts_only_rises_for_a_ceiling():
    gains = PIDGains(kp=0.0, ki=0.0, kd=10.0, smoothing=1.0)
    falling = PIDState(integral=0.2, smoothed_calls=10.0, smoothed_tokens=100.0, previous_fraction=0.3)
    lam_ceiling, _ = pid_lagrange_step(falling, budget=0.1, gains=gains, cap=2.0, floor=0.0)
    lam_target, _ = pid_lagrange_step(falling, budget=0.1, gains=gains, cap=2.0, floor=-2.0)
    assert lam_ceiling == pytest.approx(0.2)  # the fall (−0.2) is ignored under a ceiling
    assert lam_target == pytest.approx(-1.8)  # 0.2 + 10·(−0.2), both ways for a target


def test_pid_anti_windup_holds_the_integral_at_the_cap():
    gains = PIDGains(kp=1.0, ki=1.0, kd=0.0, smoothing=1.0)
    state = PIDState(integral=1.5, smoothed_calls=90.0, smoothed_tokens=100.0)
    lam, new = pid_lagrange_step(state, budget=0.1, gains=gains, cap=2.0, floor=0.0)
    # e = 0.8: kp·e + I + ki·e = 0.8 + 2.3 > cap and e > 0: the integral holds at 1.5, λ is capped
    assert lam == 2.0 and new.integral == 1.5
    # Once the error turns, the integral moves again at once (nothing to unwind).
    turned = PIDState(integral=new.integral, smoothed_calls=5.0, smoothed_tokens=100.0)
    lam, new = pid_lagrange_step(turned, budget=0.1, gains=gains, cap=2.0, floor=0.0)
    assert new.integral == pytest.approx(1.5 - 0.05) and lam == pytest.approx(-0.05 + 1.45)


def test_pid_anti_windup_at_the_floor():
    gains = PIDGains(kp=1.0, ki=1.0, kd=0.0, smoothing=1.0)
    state = PIDState(integral=-0.1, smoothed_calls=0.0, smoothed_tokens=100.0)
    lam, new = pid_lagrange_step(state, budget=0.5, gains=gains, cap=2.0, floor=0.0)
    assert lam == 0.0 and new.integral == -0.1  # e = −0.5 pushes below the floor: hold


def test_pid_step_before_any_measurement_keeps_lambda():
    lam, new = pid_lagrange_step(PIDState(), budget=0.2, gains=PIDGains(), cap=2.0, floor=0.0)
    assert lam is None and new == PIDState()


@pytest.mark.parametrize("bad", [dict(kp=-1.0), dict(ki=-0.1), dict(kd=-1.0), dict(smoothing=0.0),
                                 dict(smoothing=1.5)])
def test_pid_gains_refuse_bad_values(bad):
    with pytest.raises(ValueError, match="must"):
        PIDGains(**bad)


def test_pid_dual_resumes_exactly_through_json():
    gains = PIDGains(kp=0.7, ki=0.03, kd=0.2, smoothing=0.4)
    rollouts = [{0.1: (3 + i % 4, 50), 0.3: (10 + (i * 7) % 9, 48)} for i in range(12)]
    straight = PIDBudgetDual([0.1, 0.3], gains, cap=2.0, floor=-2.0)
    for counts in rollouts:
        straight.record(counts)
        straight.step()
    first = PIDBudgetDual([0.1, 0.3], gains, cap=2.0, floor=-2.0)
    for counts in rollouts[:5]:
        first.record(counts)
        first.step()
    resumed = PIDBudgetDual([0.1, 0.3], gains, cap=2.0, floor=-2.0)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint stores it
    for counts in rollouts[5:]:
        resumed.record(counts)
        resumed.step()
    assert resumed.lambdas == straight.lambdas and resumed.states == straight.states
    assert resumed.fractions == straight.fractions


def test_pid_dual_refuses_an_integral_rule_checkpoint():
    dual = PIDBudgetDual([0.1], PIDGains())
    with pytest.raises(ValueError, match="integral rule"):
        dual.load_state_dict({"lambdas": [[0.1, 0.0]], "history": []})


def test_integral_dual_refuses_a_pid_checkpoint():
    from agents.lagrangian import BudgetDual

    pid = PIDBudgetDual([0.1], PIDGains())
    with pytest.raises(ValueError, match="PID rule"):
        BudgetDual([0.1]).load_state_dict(pid.state_dict())


# ---------------------------------------------------------------------------- closed loop on a toy plant
def _closed_loop(dual, budget: float = 0.3, steps: int = 200, slope: float = 8.0, delay: int = 3) -> list[float]:
    """The true teacher fraction of a toy plant under ``dual``, one rollout of 1,000 tokens per step.

    The plant: f = σ(logit(b) + ½ − slope·λ), a known decreasing function of λ (λ* = 1/(2·slope)),
    that answers λ ``delay`` rollouts late (the policy learns from the reward before its teacher use
    moves). Counts are exact (no sampling noise), so any oscillation is the controller's own."""
    import math

    fractions, lambdas = [], [0.0] * (delay + 1)
    for _ in range(steps):
        lam = lambdas[-1 - delay]
        f = 1 / (1 + math.exp(-(math.log(budget / (1 - budget)) + 0.5 - slope * lam)))
        dual.record({budget: (round(f * 1000), 1000)})
        dual.step()
        lambdas.append(dual.lambdas[budget])
        fractions.append(f)
    return fractions


def _settled_at(fractions: list[float], budget: float, band: float) -> int | None:
    return next((i for i in range(len(fractions)) if all(abs(f - budget) < band for f in fractions[i:])), None)


def test_the_pid_dual_settles_where_the_integral_rule_oscillates():
    from agents.lagrangian import BudgetDual

    # The shipped configs' integral rule (η = 0.2 on a trailing window of 4 rollouts) on a steep, late plant:
    integral = _closed_loop(BudgetDual([0.3], lr=0.2, cap=4.0, floor=-4.0, window=4))
    tail = integral[-50:]
    crossings = sum((a - 0.3) * (b - 0.3) < 0 for a, b in pairwise(tail))
    assert max(abs(f - 0.3) for f in tail) > 0.05 and crossings >= 4  # a sustained oscillation, 150 steps in
    assert _settled_at(integral, 0.3, 0.01) is None

    pid = _closed_loop(PIDBudgetDual([0.3], PIDGains(), cap=4.0, floor=-4.0))
    settled = _settled_at(pid, 0.3, 0.01)
    assert settled is not None and settled <= 40  # within 0.01 of b from rollout 40 on, and stays
    tail = pid[-50:]
    assert max(abs(f - 0.3) for f in tail) < 0.001
    assert sum((a - 0.3) * (b - 0.3) < 0 for a, b in pairwise(tail)) == 0  # no oscillation left
