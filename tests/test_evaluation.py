"""Checkpoint selection's rules (§3.3): the budget check follows the Lagrangian, the sample is random."""

from __future__ import annotations

import pytest

from agents.evaluation import (
    BudgetResult,
    ForwardCosts,
    budget_violation,
    budgets_are_ceilings,
    calibrate_call_threshold,
    calibrate_kl_threshold,
    calibrate_threshold,
    costs_measured_here,
    given_forward_costs,
    meets_budgets,
    projected_latency_ms,
    quantile_call_thresholds,
    seeded_subset,
    with_projected_latency,
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


# ---------------------------------------------------------------------------------------------- calibration
def staircase(threshold: float) -> float:
    """A fallback's teacher fraction by hand: 10 tokens whose top probabilities are these."""
    top = [0.001, 0.004, 0.02, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 0.99]
    return sum(p < threshold for p in top) / len(top)


@pytest.mark.parametrize("target", [0.1, 0.2, 0.3, 0.5, 0.8])
def test_calibration_finds_a_threshold_that_hits_the_target(target):
    found = calibrate_threshold(staircase, target, tolerance=0.0)
    assert found.teacher_fraction == pytest.approx(target) and staircase(found.threshold) == pytest.approx(target)
    assert (found.threshold, found.teacher_fraction) in found.tried


def test_calibration_reaches_thresholds_far_below_0_01():
    # The 10% point sits between 0.001 and 0.004: a linear sweep over 0.01 … 0.9 never finds it.
    found = calibrate_threshold(staircase, 0.1, tolerance=0.0)
    assert 0.001 < found.threshold <= 0.004


def test_calibration_of_zero_never_falls_back_and_unreachable_targets_give_the_nearer_end():
    assert calibrate_threshold(staircase, 0.0).threshold == 0.0
    always_low = calibrate_threshold(lambda t: 0.3 * t, 0.5)  # at most 0.3: the threshold 1 is closest
    assert always_low.threshold == 1.0 and always_low.teacher_fraction == pytest.approx(0.3)
    always_high = calibrate_threshold(lambda t: 0.4, 0.1, lowest=1e-3)
    assert always_high.teacher_fraction == pytest.approx(0.4) and len(always_high.tried) == 2


def test_calibration_stops_within_tolerance_and_refuses_bad_targets():
    calls = []
    found = calibrate_threshold(lambda t: calls.append(t) or min(1.0, t), 0.25, tolerance=0.02)
    assert abs(found.teacher_fraction - 0.25) <= 0.02 and len(calls) < 16
    with pytest.raises(ValueError, match="target teacher fraction"):
        calibrate_threshold(staircase, 1.5)


def call_staircase(threshold: float) -> float:
    """Training Wheels' teacher fraction by hand: 10 tokens whose π(<τ>) are these (call iff π > c)."""
    call_probabilities = [1e-4, 0.003, 0.02, 0.1, 0.3, 0.45, 0.55, 0.7, 0.9, 0.999]
    return sum(p > threshold for p in call_probabilities) / len(call_probabilities)


@pytest.mark.parametrize("target", [0.0, 0.1, 0.3, 0.6, 0.9, 1.0])
def test_call_threshold_calibration_hits_each_target(target):
    found = calibrate_call_threshold(call_staircase, target, tolerance=0.0)
    assert found.teacher_fraction == pytest.approx(target) and call_staircase(found.threshold) == pytest.approx(target)
    assert 0.0 < found.threshold < 1.0


def test_call_threshold_calibration_keeps_one_half_when_it_already_lands():
    calls = []
    found = calibrate_call_threshold(lambda c: calls.append(c) or call_staircase(c), 0.42, tolerance=0.03)
    assert found.threshold == 0.5 and calls == [0.5] and found.teacher_fraction == pytest.approx(0.4)


def test_call_threshold_calibration_starts_from_a_given_threshold_and_keeps_it_when_it_lands():
    calls = []
    # From c = 0.2 the staircase calls 6 of 10 (0.3, 0.45, 0.55, 0.7, 0.9, 0.999): within 0.05 of 0.62, kept.
    kept = calibrate_call_threshold(lambda c: calls.append(c) or call_staircase(c), 0.62, tolerance=0.05, start=0.2)
    assert kept.threshold == 0.2 and calls == [0.2] and kept.teacher_fraction == pytest.approx(0.6)
    # From a start that misses, the search goes on as from ½ and still hits the target exactly.
    moved = calibrate_call_threshold(call_staircase, 0.3, tolerance=0.0, start=0.2)
    assert moved.tried[0] == (0.2, pytest.approx(0.6)) and moved.teacher_fraction == pytest.approx(0.3)
    assert 0.55 <= moved.threshold < 0.7
    for start in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="starting call threshold must lie strictly between 0 and 1"):
            calibrate_call_threshold(call_staircase, 0.3, start=start)


def test_call_threshold_calibration_reaches_tiny_call_probabilities_and_stops_at_the_ends():
    # 90% needs a threshold under 1e-4 … 0.003: far below ½, reached by bisecting in log-odds.
    assert 1e-4 <= calibrate_call_threshold(call_staircase, 0.9, tolerance=0.0).threshold < 0.003
    never = calibrate_call_threshold(lambda c: 0.0, 0.3)  # a policy that never calls: the lowest threshold
    assert never.teacher_fraction == 0.0 and never.threshold < 1e-5 and len(never.tried) == 2
    with pytest.raises(ValueError, match="target teacher fraction"):
        calibrate_call_threshold(call_staircase, -0.1)


def test_quantile_thresholds_call_at_each_budget_by_hand():
    import torch

    # Ten states with π(<τ>) 0.1 … 1.0. b = 0.3: the 0.7 quantile lies 0.3 of the way from 0.7 to 0.8
    # (position 0.7 · 9 = 6.3), so exactly 0.8, 0.9 and 1.0 are above it: 3 of 10 states call.
    states = torch.tensor([0.5, 0.1, 0.9, 0.3, 1.0, 0.2, 0.7, 0.4, 0.8, 0.6])
    thresholds = quantile_call_thresholds({0.0: states, 0.3: states, 0.5: states, 1.0: states})
    assert thresholds[0.3] == pytest.approx(0.73) and thresholds[0.5] == pytest.approx(0.55)
    assert thresholds[0.0] == pytest.approx(1.0) and thresholds[1.0] == pytest.approx(0.1)
    for b, c in thresholds.items():  # "call iff π > c" calls at b, but at b = 1 (the smallest π is not above itself)
        assert float((states > c).float().mean()) == pytest.approx(min(b, 0.9))
    # Each budget reads its own states; none recorded, or a budget outside [0, 1], is refused by name.
    assert quantile_call_thresholds({0.2: torch.tensor([0.9, 0.1, 0.3, 0.6, 0.4])})[0.2] == pytest.approx(0.66)
    with pytest.raises(ValueError, match="no decoding states were recorded under budget 0.2"):
        quantile_call_thresholds({0.2: torch.tensor([])})
    with pytest.raises(ValueError, match="budgets lie in \\[0, 1\\], got 1.5"):
        quantile_call_thresholds({1.5: states})


def kl_staircase(threshold: float) -> float:
    """The KL oracle's teacher fraction by hand: 10 tokens with these KL(p ‖ π_V) (call iff KL > k)."""
    kls = [1e-3, 0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 9.0, 30.0]
    return sum(kl > threshold for kl in kls) / len(kls)


@pytest.mark.parametrize("target", [0.0, 0.1, 0.4, 0.9, 1.0])
def test_kl_threshold_calibration_hits_each_target(target):
    found = calibrate_kl_threshold(kl_staircase, target, tolerance=0.0)
    assert found.teacher_fraction == pytest.approx(target) and kl_staircase(found.threshold) == pytest.approx(target)
    assert 1e-4 <= found.threshold <= 100.0
    with pytest.raises(ValueError, match="lowest < highest"):
        calibrate_kl_threshold(kl_staircase, target, lowest=1.0, highest=0.5)


# ---------------------------------------------------------------------------------------------- cost model
def test_projected_latency_by_hand():
    costs = ForwardCosts(teacher_ms=55.0, student_ms=14.0, label="H100")
    # 3 teacher forwards and 20 student forwards: 3 * 55 + 20 * 14 = 445 ms.
    assert projected_latency_ms(3, 20, costs) == pytest.approx(445.0)
    assert projected_latency_ms(0, 0, costs) == 0.0
    with pytest.raises(ValueError, match="must be positive"):
        ForwardCosts(teacher_ms=0.0, student_ms=1.0, label="x")


def test_given_costs_come_both_or_neither_and_project_each_row():
    assert given_forward_costs(None, None, "x") is None
    for half in ((55.0, None), (None, 14.0), (55.0, -1.0)):
        with pytest.raises(ValueError, match="given together and positive"):
            given_forward_costs(*half, "x")
    costs = given_forward_costs(55.0, 14.0, "")
    assert costs is not None and costs.label == "given"
    rows = [{"method": "fallback", "teacher_forwards_per_example": 3.0, "student_forwards_per_example": 20.0},
            {"method": "teacher", "teacher_forwards_per_example": None, "student_forwards_per_example": 0.0}]
    projected = with_projected_latency(rows, costs)
    assert projected[0]["projected_latency_ms"] == pytest.approx(445.0)
    assert projected[1]["projected_latency_ms"] != projected[1]["projected_latency_ms"]  # NaN: forwards unknown
    assert "projected_latency_ms" not in rows[0]  # the input rows are left as they were
    assert all(r["projected_latency_ms"] != r["projected_latency_ms"] for r in with_projected_latency(rows, None))


def test_costs_measured_here_divide_latency_by_forwards():
    rows = [
        {"method": "student", "latency_ms_median": 30.0, "student_forwards_per_example": 15.0},
        {"method": "teacher", "latency_ms_median": 120.0, "teacher_forwards_per_example": 12.0},
        {"method": "fallback", "latency_ms_median": 80.0, "teacher_forwards_per_example": 3.0},
    ]
    costs = costs_measured_here(rows)
    assert costs is not None and (costs.teacher_ms, costs.student_ms) == (10.0, 2.0)
    assert costs_measured_here(rows[:1]) is None  # no teacher row
    assert costs_measured_here([{**rows[0], "latency_ms_median": None}, rows[1]]) is None  # latency not measured


def test_the_one_decode_loop_counts_by_hand():
    from agents.decoding import DecodeResult
    from agents.evaluation import decode_batches

    class Tokenizer:  # what decode_batches reads of a tokenizer
        def batch_decode(self, rows, skip_special_tokens):
            return [" ".join(map(str, row)) for row in rows]

    results = iter([
        DecodeResult([[5, 1], [6, 7, 1]], [[False, False], [True, False, False]], [0, 1], 1, [2, 0]),
        DecodeResult([[8, 9, 9, 1]], [[True, True, False, False]], [2], 1, [1]),
    ])
    seen = []

    def decode(*inputs):
        seen.append(inputs)
        return next(results)

    decoded = decode_batches(decode, [("a", "b"), ("c", "d", "e", "f")], Tokenizer())
    assert seen == [("a", "b"), ("c", "d", "e", "f")]  # each batch's prompts, unpacked, in order
    assert decoded.texts == ["5 1", "6 7 1", "8 9 9 1"]
    assert decoded.output_ids == [[5, 1], [6, 7, 1], [8, 9, 9, 1]]
    assert decoded.from_teacher[1] == [True, False, False]
    assert (decoded.teacher_calls, decoded.tokens, decoded.wasted) == (3, 9, 3)
    assert decoded.teacher_fraction == 3 / 9 and decoded.seconds >= 0.0
    assert decode_batches(decode, [], Tokenizer()).teacher_fraction == 0.0  # nothing decoded: 0, not 0/0


def test_a_method_is_one_registered_class(monkeypatch):
    from types import SimpleNamespace

    import torch

    from agents import methods
    from agents.evaluation import Setting

    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))  # registered for this test only
    assert list(methods.METHODS) == ["student", "teacher", "training_wheels", "distillspec", "speculative",
                                     "fallback", "co_llm", "bild", "kl_oracle"]

    @methods.register
    class Echo(methods.EvalMethod):
        name = "echo"
        needs = ("draft", "--draft DIR")

        def settings(self):
            return [Setting(self.name, f"t={t:g}", lambda i, m: None, threshold=t) for t in self.options.thresholds]

    @methods.register
    class EchoCalibrated(methods.EvalMethod):
        name, follows = "echo_calibrated", "echo"

        def settings(self):
            return []

        def calibrate(self):
            self.context.reports["echo"] = "calibrated"
            first = self.context.methods["echo"].settings()[0]  # a follower reads the method it follows
            return [Setting(self.name, f"{first.setting} calibrated", first.decode, calibrated_for=0.5)]

    with pytest.raises(ValueError, match="registered already"):
        methods.register(Echo)
    options = SimpleNamespace(env_kwargs={}, thresholds=[0.1, 0.2], draft=None,
                              selected_methods=lambda: ["echo_calibrated", "echo"])
    assert not Echo.by_default(options) and not EchoCalibrated.by_default(options)
    with pytest.raises(ValueError, match="method 'echo' needs --draft DIR"):
        Echo.check(options)
    context = methods.EvalContext(options, task=None, device=torch.device("cpu"))
    rows = [(s.method, s.setting) for s in methods.build_settings(context)]
    assert rows == [("echo", "t=0.1"), ("echo", "t=0.2"), ("echo_calibrated", "t=0.1 calibrated")]
    assert context.reports == {"echo": "calibrated"}


def _record(step: int, meets: bool, quality: float) -> dict:
    return {"step": step, "meets_budgets": meets, "mean_quality": quality}


def test_settle_point_needs_budgets_met_and_quality_flat():
    from agents.evaluation import settle_point

    history = [_record(0, False, 10.0), _record(25, True, 30.0), _record(50, True, 29.0), _record(75, True, 30.5)]
    # The last two meet every budget and their best (30.5) beats the best before (30.0) by 0.5:
    assert settle_point(history, consecutive=2) is None  # still improving
    settled = settle_point(history, consecutive=2, min_gain=1.0)  # a gain under 1.0 is not improving
    assert settled is not None and settled["step"] == 75 and "batches 50, 75" in settled["reason"]
    assert settle_point(history, consecutive=3, min_gain=1.0) is None  # 25, 50, 75 rose 20.5 above batch 0
    assert settle_point(history, consecutive=4, min_gain=100.0) is None  # nothing before to compare with
    assert settle_point(history[:3] + [_record(75, False, 20.0)], consecutive=2, min_gain=100.0) is None  # a miss
    assert settle_point(history, consecutive=0) is None  # the rule is off


def test_settings_that_decode_alike_are_decoded_once_and_keep_their_own_labels():
    """A setting whose decoder and parameters an earlier one had (``decodes_like``) gets that one's row and
    outputs under its own label; settings without a key, or with a new one, are each evaluated."""
    from agents.evaluation import Setting, evaluate_settings

    def decode(*inputs):  # never called: evaluate_one below stands in for the decode loop
        raise AssertionError

    settings = [
        Setting("fallback", "t=0", decode, threshold=0.0, decodes_like=("fallback", 0.0)),
        Setting("fallback", "t=0.5", decode, threshold=0.5, decodes_like=("fallback", 0.5)),
        Setting("fallback", "t=0 (for 0)", decode, threshold=0.0, calibrated_for=0.0, decodes_like=("fallback", 0.0)),
        Setting("training_wheels", "b=0.1", decode, budget=0.1),
        Setting("training_wheels", "b=0.1", decode, budget=0.1),  # no key: decoded again
    ]
    evaluated = []

    def evaluate_one(setting):
        evaluated.append(setting.setting)
        row = {"method": setting.method, "setting": setting.setting, "threshold": setting.threshold,
               "calibrated_for": setting.calibrated_for, "quality": 10.0 * len(evaluated), "latency_ms_median": 3.0}
        return row, [{"method": setting.method, "setting": setting.setting, "index": 0, "output": f"x{len(evaluated)}"}]

    out = list(evaluate_settings(settings, evaluate_one))
    assert evaluated == ["t=0", "t=0.5", "b=0.1", "b=0.1"]
    rows = [row for row, _ in out]
    assert [r["setting"] for r in rows] == [s.setting for s in settings]
    copied, first = rows[2], rows[0]
    assert copied["calibrated_for"] == 0.0 and first["calibrated_for"] is None
    assert {k: v for k, v in copied.items() if k not in ("setting", "calibrated_for")} == {
        k: v for k, v in first.items() if k not in ("setting", "calibrated_for")}
    assert out[2][1] == [{"method": "fallback", "setting": "t=0 (for 0)", "index": 0, "output": "x1"}]
    assert rows[3]["quality"] != rows[4]["quality"]
