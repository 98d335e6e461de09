"""Each function of agents.objectives against a small hand computation (numbers written out)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from agents.objectives import (
    CAP_RULES,
    budget_allowance,
    confidence_fallback,
    forward_kl,
    lagrange_step,
    lossy_speculative_accept_length,
    oracle_call_mask,
    pcl_consistency_error,
    pcl_loss,
    phase1_loss,
    phase1_loss_terms,
    reverse_kl,
    teacher_distribution,
    teacher_student_kl,
    teacher_student_kl_fast,
)

ln = math.log


def logits_of(*probs: float) -> list[float]:
    """Logits whose softmax is ``probs`` (which sum to 1)."""
    return [ln(p) for p in probs]


# ---------------------------------------------------------------------------------------------
# 1. teacher_student_kl
# ---------------------------------------------------------------------------------------------

# Teacher p = [0.5, 0.25, 0.25]; student over V+1 = [0.2, 0.2, 0.1 | <τ> 0.5], so π_V = [0.4, 0.4, 0.2].
P = [0.5, 0.25, 0.25]
PI_V = [0.4, 0.4, 0.2]
KL_P_PI = 0.5 * ln(0.5 / 0.4) + 0.25 * ln(0.25 / 0.4) + 0.25 * ln(0.25 / 0.2)  # ≈ 0.049857
KL_PI_P = 0.4 * ln(0.4 / 0.5) + 0.4 * ln(0.4 / 0.25) + 0.2 * ln(0.2 / 0.25)  # ≈ 0.054967


def test_teacher_student_kl_drops_call_logit_and_renormalises():
    teacher = torch.tensor([[logits_of(*P)]])  # [1, 1, 3]
    student = torch.tensor([[logits_of(0.2, 0.2, 0.1, 0.5)]])  # [1, 1, 4], <τ> last
    kl = teacher_student_kl(teacher, student)
    assert kl.shape == (1, 1)
    assert kl.item() == pytest.approx(KL_P_PI, abs=1e-6)
    assert KL_P_PI == pytest.approx(0.049857, abs=1e-6)


def test_teacher_student_kl_accepts_student_without_call_logit():
    teacher = torch.tensor([[logits_of(*P), logits_of(0.9, 0.05, 0.05)]])  # [1, 2, 3]
    # Unnormalised student logits (shifted by +3): only differences matter.
    student = torch.tensor([[[ln(0.4) + 3, ln(0.4) + 3, ln(0.2) + 3], logits_of(1 / 3, 1 / 3, 1 / 3)]])
    kl = teacher_student_kl(teacher, student)
    second = 0.9 * ln(0.9 * 3) + 2 * 0.05 * ln(0.05 * 3)
    assert kl.tolist()[0] == pytest.approx([KL_P_PI, second], abs=1e-6)


def test_teacher_student_kl_zero_probability_teacher_entry_is_finite():
    # p = [1, 0, 0] with the zeros given as -inf logits: KL = 1·ln(1/0.4) = ln 2.5 (0·log 0 = 0).
    teacher = torch.tensor([[[0.0, -math.inf, -math.inf]]])
    student = torch.tensor([[logits_of(0.4, 0.4, 0.2)]])
    assert teacher_student_kl(teacher, student).item() == pytest.approx(ln(2.5), abs=1e-6)


def test_teacher_student_kl_is_zero_for_identical_distributions_and_has_grad():
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 5)
    student = torch.cat([teacher.clone(), torch.randn(2, 3, 1)], dim=-1).requires_grad_()
    kl = teacher_student_kl(teacher, student)
    assert torch.allclose(kl, torch.zeros(2, 3), atol=1e-6)
    kl.sum().backward()
    assert student.grad is not None


@pytest.mark.parametrize(
    "teacher_shape, student_shape",
    [((1, 2, 3), (1, 2, 5)), ((1, 2, 3), (1, 3, 4)), ((2, 2, 3), (1, 2, 4)), ((1, 2, 3), (1, 2, 2))],
)
def test_teacher_student_kl_rejects_mismatched_shapes(teacher_shape, student_shape):
    with pytest.raises(ValueError):
        teacher_student_kl(torch.zeros(teacher_shape), torch.zeros(student_shape))


# ---------------------------------------------------------------------------------------------
# 2. oracle_call_mask
# ---------------------------------------------------------------------------------------------

KL_ROW = [0.1, 0.5, 0.3, 0.5, 0.2]


@pytest.mark.parametrize(
    "budget, expected",
    [
        (0.0, [0, 0, 0, 0, 0]),  # b = 0 gives nothing
        (0.2, [0, 1, 0, 0, 0]),  # k = 1: tie 0.5 at positions 1 and 3 -> earlier wins
        (0.4, [0, 1, 0, 1, 0]),  # k = 2
        (0.5, [0, 1, 0, 1, 0]),  # k = floor(2.5) = 2
        (0.6, [0, 1, 1, 1, 0]),  # k = floor(5 x 0.6) = 3
        (0.8, [0, 1, 1, 1, 1]),  # k = 4
        (1.0, [1, 1, 1, 1, 1]),
    ],
)
def test_oracle_call_mask_top_k_with_ties(budget, expected):
    out = oracle_call_mask(torch.tensor([KL_ROW]), torch.ones(1, 5, dtype=torch.bool), torch.tensor([budget]))
    assert out.dtype == torch.bool
    assert out.int().tolist() == [expected]


def test_oracle_call_mask_all_ties_pick_earliest():
    out = oracle_call_mask(torch.zeros(1, 5), torch.ones(1, 5), torch.tensor([0.4]))
    assert out.int().tolist() == [[1, 1, 0, 0, 0]]


@pytest.mark.parametrize(
    "length, budget, dtype, expected_k",
    [
        (10, 0.3, torch.float64, 3),  # 10 x 0.3 = 3.0000000000000004
        (10, 0.7, torch.float64, 7),  # 10 x 0.7 rounds to just below/above 7
        (10, 0.7, torch.float32, 7),  # float32 0.7 = 0.699999988...
        (1000, 0.7, torch.float32, 700),  # 699.99998... must still give 700
        (1000, 0.3, torch.float32, 300),
        (5, 0.5, torch.float64, 2),
        (3, 0.1, torch.float64, 0),
        (7, 0.5, torch.float64, 3),
    ],
)
def test_oracle_call_mask_floor_of_l_times_b(length, budget, dtype, expected_k):
    kl = torch.linspace(0.0, 1.0, length).unsqueeze(0)
    out = oracle_call_mask(kl, torch.ones(1, length, dtype=torch.bool), torch.tensor([budget], dtype=dtype))
    assert int(out.sum()) == expected_k
    # Highest KL = last positions (linspace is increasing).
    assert out[0, length - expected_k :].all()


def test_oracle_call_mask_never_marks_padding_and_uses_valid_length():
    # Row 0: l = 2 (huge KL in padding), b = 0.5 -> k = 1 -> position 1.
    # Row 1: l = 4, b = 0.5 -> k = 2 -> positions 0 and 2 (KL 0.9, 0.8).
    kl = torch.tensor([[0.1, 0.2, 9.0, 9.0], [0.9, 0.1, 0.8, 0.3]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = oracle_call_mask(kl, mask, torch.tensor([0.5, 0.5]))
    assert out.int().tolist() == [[0, 1, 0, 0], [1, 0, 1, 0]]
    # b = 1 marks every valid position but still no padding.
    out = oracle_call_mask(kl, mask, torch.tensor([1.0, 1.0]))
    assert out.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_oracle_call_mask_per_row_budgets_and_float_mask():
    kl = torch.tensor([[0.3, 0.1, 0.2, 0.4], [0.3, 0.1, 0.2, 0.4]])
    mask = torch.ones(2, 4)  # float mask
    out = oracle_call_mask(kl, mask, torch.tensor([0.25, 0.75]))
    assert out.int().tolist() == [[0, 0, 0, 1], [1, 0, 1, 1]]


@pytest.mark.parametrize(
    "kl_shape, mask_shape, budgets",
    [
        ((2, 4), (2, 3), [0.1, 0.2]),
        ((2, 4), (2, 4), [0.1]),
        ((2, 4), (2, 4), [0.1, 1.5]),
        ((4,), (4,), [0.1]),
    ],
)
def test_oracle_call_mask_rejects_bad_inputs(kl_shape, mask_shape, budgets):
    with pytest.raises(ValueError):
        oracle_call_mask(torch.zeros(kl_shape), torch.ones(mask_shape), torch.tensor(budgets))


def test_oracle_call_mask_stochastic_rounding_by_hand():
    # l = 8, b = 0.1: l·b = 0.8 -> floor 0; a draw below 0.8 adds the single highest-KL position.
    kl = torch.tensor([[0.1, 0.7, 0.2, 0.9, 0.3, 0.4, 0.5, 0.6]]).repeat(2, 1)
    mask = torch.ones(2, 8, dtype=torch.bool)
    out = oracle_call_mask(kl, mask, torch.tensor([0.1, 0.1]), round_up_draws=torch.tensor([0.79, 0.81]))
    assert out.int().tolist() == [[0, 0, 0, 1, 0, 0, 0, 0], [0] * 8]
    # l = 10, b = 0.3 is already whole: no draw adds a call.
    kl10 = torch.linspace(0, 1, 10).unsqueeze(0)
    out = oracle_call_mask(kl10, torch.ones(1, 10), torch.tensor([0.3]), round_up_draws=torch.tensor([0.0]))
    assert int(out.sum()) == 3


def test_oracle_call_mask_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    rows, length, budget = 20000, 8, 0.1
    kl = torch.rand(rows, length, generator=g)
    out = oracle_call_mask(kl, torch.ones(rows, length), torch.full((rows,), budget),
                           round_up_draws=torch.rand(rows, generator=g))
    assert abs(out.float().mean().item() - budget) < 0.005  # the floor would give exactly 0
    assert set(out.sum(1).tolist()) == {0, 1}


@pytest.mark.parametrize("draws", [[0.5], [0.5, 1.0], [-0.1, 0.2], [float("nan"), 0.2]])
def test_oracle_call_mask_rejects_bad_round_up_draws(draws):
    with pytest.raises(ValueError, match="round_up_draws"):
        oracle_call_mask(torch.zeros(2, 4), torch.ones(2, 4), torch.tensor([0.1, 0.2]), round_up_draws=torch.tensor(draws))


# ---------------------------------------------------------------------------------------------
# 3. phase1_loss
# ---------------------------------------------------------------------------------------------

# V = 2.  Position 0: π = [0.2, 0.3 | <τ> 0.5], p = [0.5, 0.5].  Position 1: π = [0.6, 0.2 | 0.2], p = [0.9, 0.1].
PH1_STUDENT = [logits_of(0.2, 0.3, 0.5), logits_of(0.6, 0.2, 0.2)]
PH1_TEACHER = [logits_of(0.5, 0.5), logits_of(0.9, 0.1)]
KL0 = 0.5 * ln(0.5 / 0.4) + 0.5 * ln(0.5 / 0.6)  # π_V = [0.4, 0.6]
KL1 = 0.9 * ln(0.9 / 0.75) + 0.1 * ln(0.1 / 0.25)  # π_V = [0.75, 0.25]


# Imitation positions also pay −log(1 − π(<τ>)): −ln 0.5 at position 0, −ln 0.8 at position 1.
STAY0, STAY1 = -ln(0.5), -ln(0.8)


@pytest.mark.parametrize(
    "call_mask, expected, literal",
    [
        ([True, False], (-ln(0.5) + KL1 + STAY1) / 2, False),  # call at 0, imitate at 1
        ([False, True], (KL0 + STAY0 + -ln(0.2)) / 2, False),
        ([False, False], (KL0 + STAY0 + KL1 + STAY1) / 2, False),
        ([True, True], (-ln(0.5) - ln(0.2)) / 2, False),
        ([True, False], (-ln(0.5) + KL1) / 2, True),  # ≈ 0.382804: the paper's literal loss
        ([False, False], (KL0 + KL1) / 2, True),
    ],
)
def test_phase1_loss_by_hand(call_mask, expected, literal):
    loss = phase1_loss(
        torch.tensor([PH1_STUDENT]),
        torch.tensor([PH1_TEACHER]),
        torch.tensor([call_mask]),
        torch.ones(1, 2, dtype=torch.bool),
        literal=literal,
    )
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_phase1_loss_hand_value_default():
    """The default loss, in decimals: call at 0 (−ln π(<τ>) = −ln 0.5 = 0.693147), imitate at 1
    (KL(p ‖ π_V) = 0.9 ln(0.9/0.75) + 0.1 ln(0.1/0.25) = 0.072460, plus −ln(1 − π(<τ>)) = −ln 0.8 =
    0.223144)."""
    loss = phase1_loss(
        torch.tensor([PH1_STUDENT]),
        torch.tensor([PH1_TEACHER]),
        torch.tensor([[True, False]]),
        torch.ones(1, 2),
    )
    assert loss.item() == pytest.approx((0.693147 + 0.072460 + 0.223144) / 2, abs=1e-5)


def test_phase1_loss_hand_value_literal():
    """The paper's literal loss, in decimals: the imitation position pays KL(p ‖ π_V) alone,
    without the −ln(1 − π(<τ>)) = 0.223144 of the default.  Imitate at 0 (π_V = [0.4, 0.6]:
    0.5 ln(0.5/0.4) + 0.5 ln(0.5/0.6) = 0.020411), call at 1 (−ln 0.2 = 1.609438)."""
    loss = phase1_loss(
        torch.tensor([PH1_STUDENT]),
        torch.tensor([PH1_TEACHER]),
        torch.tensor([[False, True]]),
        torch.ones(1, 2),
        literal=True,
    )
    assert loss.item() == pytest.approx((0.020411 + 1.609438) / 2, abs=1e-5)


def test_phase1_imitation_is_kl_to_the_teacher_extended_by_zero_mass_on_call():
    """KL(p ‖ π_V) − log(1 − π(<τ>)) is exactly KL(p̃ ‖ π) with p̃ = (p, 0) over V+1."""
    student = torch.tensor([PH1_STUDENT])
    teacher = torch.tensor([PH1_TEACHER])
    loss = phase1_loss(student, teacher, torch.tensor([[False, False]]), torch.ones(1, 2))
    p_ext = torch.cat([torch.softmax(teacher, -1), torch.zeros(1, 2, 1)], dim=-1)
    log_pi = torch.log_softmax(student, -1)
    direct = (p_ext * (torch.log(p_ext.clamp_min(1e-30)) - log_pi)).sum(-1).mean()
    assert loss.item() == pytest.approx(direct.item(), abs=1e-6)


def test_phase1_loss_ignores_padding_even_if_call_mask_marks_it():
    student = torch.tensor([PH1_STUDENT + [[5.0, -3.0, 1.0]]])  # third position is padding
    teacher = torch.tensor([PH1_TEACHER + [[-4.0, 4.0]]])
    loss = phase1_loss(
        student, teacher, torch.tensor([[True, False, True]]), torch.tensor([[True, True, False]])
    )
    assert loss.item() == pytest.approx((-ln(0.5) + KL1 + STAY1) / 2, abs=1e-6)


def test_phase1_loss_terms_and_gradient():
    student = torch.tensor([PH1_STUDENT], requires_grad=True)
    call_nll, kl = phase1_loss_terms(student, torch.tensor([PH1_TEACHER]))
    assert call_nll.tolist()[0] == pytest.approx([-ln(0.5), -ln(0.2)], abs=1e-6)
    assert kl.tolist()[0] == pytest.approx([KL0, KL1], abs=1e-6)
    # Gradient of −log π(<τ>) w.r.t. the <τ> logit is π(<τ>) − 1 = −0.5 at position 0.
    phase1_loss(
        student, torch.tensor([PH1_TEACHER]), torch.tensor([[True, False]]), torch.ones(1, 2)
    ).backward()
    assert student.grad[0, 0, 2].item() == pytest.approx(-0.5 / 2, abs=1e-6)


def test_phase1_loss_requires_call_logit_and_matching_masks():
    with pytest.raises(ValueError):
        phase1_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2), torch.ones(1, 2))
    with pytest.raises(ValueError):
        phase1_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 2), torch.zeros(1, 3), torch.ones(1, 2))
    with pytest.raises(ValueError):
        phase1_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 2), torch.zeros(1, 2), torch.ones(2, 2))


# ---------------------------------------------------------------------------------------------
# 4. PCL
# ---------------------------------------------------------------------------------------------

# One episode of 3 steps, τ = 0.5:
#   log π = [-0.5, -1.0, -2.0], V = [0.3, -0.2, 0.5], r = [1.0, -1.0, 0.5]
#   u = r − τ log π = [1.25, -0.5, 1.5]
LOG_PI = [-0.5, -1.0, -2.0]
VALUES = [0.3, -0.2, 0.5]
REWARDS = [1.0, -1.0, 0.5]
TAU = 0.5


def episode_consistency(gamma: float, horizon: int | None, **kwargs) -> torch.Tensor:
    """C of the one 3-step episode above (``kwargs``: e.g. a bootstrap value)."""
    return pcl_consistency_error(torch.tensor([LOG_PI]), torch.tensor([VALUES]), torch.tensor([REWARDS]),
                                 torch.ones(1, 3), TAU, gamma, horizon, **kwargs)


@pytest.mark.parametrize(
    "gamma, horizon, expected",
    [
        # d = 1: C_i = −V_i + γ V_{i+1} + u_i
        (1.0, 1, [-0.3 - 0.2 + 1.25, 0.2 + 0.5 - 0.5, -0.5 + 0.0 + 1.5]),  # [0.75, 0.2, 1.0]
        # d = 2: C_0 = −0.3 + V_2 + u_0 + u_1; C_1 = 0.2 + 0 + u_1 + u_2 (truncated); C_2 = −0.5 + u_2
        (1.0, 2, [-0.3 + 0.5 + 1.25 - 0.5, 0.2 + 0.0 - 0.5 + 1.5, -0.5 + 1.5]),  # [0.95, 1.2, 1.0]
        # whole episode: C_0 = −0.3 + 2.25
        (1.0, None, [1.95, 1.2, 1.0]),
        (1.0, 10, [1.95, 1.2, 1.0]),  # horizon longer than the episode = whole episode
        # γ = 0.5
        (0.5, 1, [-0.3 + 0.5 * -0.2 + 1.25, 0.2 + 0.5 * 0.5 - 0.5, -0.5 + 1.5]),  # [0.85, -0.05, 1.0]
        # [0.825, 0.45, 1.0]
        (0.5, 2, [-0.3 + 0.25 * 0.5 + 1.25 + 0.5 * -0.5, 0.2 + 0.0 - 0.5 + 0.5 * 1.5, 1.0]),
        (0.5, None, [-0.3 + 1.25 - 0.25 + 0.25 * 1.5, 0.45, 1.0]),  # [1.075, 0.45, 1.0]
        (0.0, None, [-0.3 + 1.25, 0.2 - 0.5, -0.5 + 1.5]),  # γ = 0: one-step reward only
    ],
)
def test_pcl_consistency_error_by_hand(gamma, horizon, expected):
    c = episode_consistency(gamma, horizon)
    assert c.shape == (1, 3)
    assert c.tolist()[0] == pytest.approx(expected, abs=1e-6)


def test_pcl_consistency_error_literal_values():
    c = episode_consistency(0.5, 2)
    assert c.tolist()[0] == pytest.approx([0.825, 0.45, 1.0], abs=1e-6)


@pytest.mark.parametrize(
    "gamma, horizon, expected",
    [
        (1.0, 1, [0.75, 0.2, 1.0 + 2.0]),  # only the last window reaches the end
        (1.0, None, [1.95 + 2.0, 1.2 + 2.0, 1.0 + 2.0]),
        (0.5, None, [1.075 + 0.125 * 2.0, 0.45 + 0.25 * 2.0, 1.0 + 0.5 * 2.0]),  # γ^{L−i} · bootstrap
    ],
)
def test_pcl_consistency_error_bootstrap_for_truncated_episode(gamma, horizon, expected):
    c = episode_consistency(gamma, horizon, bootstrap=torch.tensor([2.0]))
    assert c.tolist()[0] == pytest.approx(expected, abs=1e-6)


def _padded_batch() -> tuple[torch.Tensor, ...]:
    """Row 0: the 3-step episode.  Row 1: its first 2 steps, then padding full of garbage."""
    nan, inf = float("nan"), float("inf")
    log_pi = torch.tensor([LOG_PI, [-0.5, -1.0, -inf]])
    values = torch.tensor([VALUES, [0.3, -0.2, nan]])
    rewards = torch.tensor([REWARDS, [1.0, -1.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return log_pi, values, rewards, mask


@pytest.mark.parametrize(
    "horizon, row1",
    [
        # Row 1 ends after step 1, so V after it is 0: C_0 = −0.3 − 0.2 + 1.25, C_1 = 0.2 + 0 − 0.5.
        (1, [0.75, -0.3, 0.0]),
        (None, [-0.3 + 1.25 - 0.5, -0.3, 0.0]),  # [0.45, -0.3, 0]
    ],
)
def test_pcl_consistency_error_masks_padding(horizon, row1):
    c = pcl_consistency_error(*_padded_batch(), tau=TAU, gamma=1.0, horizon=horizon)
    assert torch.isfinite(c).all()
    assert c.tolist()[1] == pytest.approx(row1, abs=1e-6)
    assert c.tolist()[0] == pytest.approx([0.75, 0.2, 1.0] if horizon == 1 else [1.95, 1.2, 1.0], abs=1e-6)


def test_pcl_loss_normalisation_by_rows():
    loss = pcl_loss(*_padded_batch(), tau=TAU)
    # ½ Σ C² over valid positions, / B = 2 rows.
    expected = 0.5 * (1.95**2 + 1.2**2 + 1.0**2 + 0.45**2 + 0.3**2) / 2  # = 1.63375
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1.63375)


def test_pcl_loss_gradients_reach_policy_and_values():
    log_pi = torch.tensor([LOG_PI], requires_grad=True)
    values = torch.tensor([VALUES], requires_grad=True)
    pcl_loss(log_pi, values, torch.tensor([REWARDS]), torch.ones(1, 3), TAU).backward()
    # C = [1.95, 1.2, 1.0] (whole episode).  ∂/∂V_i of ½ΣC² = −C_i (V_i enters only its own window).
    assert values.grad.tolist()[0] == pytest.approx([-1.95, -1.2, -1.0], abs=1e-6)
    # ∂/∂log π_j = −τ Σ_{i ≤ j} C_i.
    assert log_pi.grad.tolist()[0] == pytest.approx([-0.5 * 1.95, -0.5 * 3.15, -0.5 * 4.15], abs=1e-6)


def test_pcl_consistency_error_zero_at_soft_optimum():
    # One-state bandit twice in a row: p = [0.7, 0.3], τ = 1, r = log p, π = p, V = 0 -> C ≡ 0.
    p = torch.tensor([0.7, 0.3])
    actions = torch.tensor([[0, 1], [1, 1]])
    log_p = p.log()[actions]
    c = pcl_consistency_error(log_p, torch.zeros(2, 2), log_p, torch.ones(2, 2), tau=1.0)
    assert torch.allclose(c, torch.zeros(2, 2), atol=1e-7)


def test_pcl_matches_loop_reference_on_random_batch():
    torch.manual_seed(1)
    B, T = 3, 6
    log_pi, values, rewards = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    lengths = [6, 4, 1]
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    boot = torch.randn(B)
    tau, gamma = 0.7, 0.9
    for horizon in (1, 2, 3, None):
        got = pcl_consistency_error(log_pi, values, rewards, mask, tau, gamma, horizon, boot)
        for b in range(B):
            L = lengths[b]
            for i in range(T):
                if i >= L:
                    assert got[b, i].item() == 0.0
                    continue
                d = L - i if horizon is None else min(horizon, L - i)
                want = -values[b, i].item()
                for j in range(d):
                    want += gamma**j * (rewards[b, i + j].item() - tau * log_pi[b, i + j].item())
                tail = values[b, i + d].item() if i + d < L else boot[b].item()
                want += gamma**d * tail
                assert got[b, i].item() == pytest.approx(want, abs=1e-5), (horizon, b, i)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"values": torch.zeros(1, 4)},
        {"rewards": torch.zeros(2, 3)},
        {"mask": torch.ones(1, 2)},
        {"mask": torch.tensor([[True, False, True]])},  # not a prefix
        {"horizon": 0},
        {"gamma": 1.5},
        {"bootstrap": torch.zeros(2)},
    ],
)
def test_pcl_rejects_bad_inputs(kwargs):
    args = {
        "log_pi": torch.zeros(1, 3),
        "values": torch.zeros(1, 3),
        "rewards": torch.zeros(1, 3),
        "mask": torch.ones(1, 3),
        "tau": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        pcl_consistency_error(**args)


# ---------------------------------------------------------------------------------------------
# 5. lagrange_step
# ---------------------------------------------------------------------------------------------


def test_lagrange_step_update_and_clipping():
    lambdas = {0.1: 0.5, 0.2: 0.7, 0.3: 0.0, 0.5: 1.999}
    before = dict(lambdas)
    out = lagrange_step(lambdas, {0.1: 0.3, 0.3: 0.1, 0.5: 1.0}, lr=1e-2, cap=2.0)
    assert out[0.1] == pytest.approx(0.5 + 0.01 * (0.3 - 0.1))  # 0.502: over budget -> λ rises
    assert out[0.3] == 0.0  # 0 + 0.01·(0.1 − 0.3) < 0 -> clipped at 0
    assert out[0.5] == 2.0  # 1.999 + 0.005 > 2 -> clipped at the cap
    assert out[0.2] == 0.7  # no fraction measured -> unchanged
    assert lambdas == before  # pure
    assert out is not lambdas


def test_lagrange_step_with_a_negative_floor_treats_the_budget_as_a_target():
    out = lagrange_step({0.5: 0.0, 0.1: -1.99}, {0.5: 0.3, 0.1: 0.0}, lr=0.5, cap=2.0, floor=-2.0)
    assert out[0.5] == pytest.approx(0.0 + 0.5 * (0.3 - 0.5))  # -0.1: under-use pushes λ below 0
    assert out[0.1] == -2.0  # -1.99 - 0.05 clipped at the floor


@pytest.mark.parametrize("cap, floor", [(-1.0, -2.0), (1.0, 1.5)])
def test_lagrange_step_rejects_bad_bounds(cap, floor):
    with pytest.raises(ValueError, match="floor"):
        lagrange_step({0.1: 0.0}, {0.1: 0.2}, cap=cap, floor=floor)


def test_lagrange_step_exact_budget_leaves_lambda():
    assert lagrange_step({0.3: 1.2}, {0.3: 0.3}) == {0.3: pytest.approx(1.2)}


@pytest.mark.parametrize("fractions", [{0.1: 1.5}, {0.1: -0.1}, {0.1: float("nan")}, {0.4: 0.2}])
def test_lagrange_step_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError):
        lagrange_step({0.1: 0.0, 0.2: 0.0}, fractions)


# ---------------------------------------------------------------------------------------------
# 7. lossy_speculative_accept_length
# ---------------------------------------------------------------------------------------------

# Teacher probability of the draft token / of the teacher argmax, K = 4:
#   p(x)    = [0.5, 0.3, 0.1, 0.4]
#   p(x̂)   = [0.5, 0.5, 0.6, 0.4]     ratio = [1, 0.6, 0.1667, 1]
DRAFT = torch.tensor([[ln(0.5), ln(0.3), ln(0.1), ln(0.4)]])
BEST = torch.tensor([[ln(0.5), ln(0.5), ln(0.6), ln(0.4)]])


@pytest.mark.parametrize(
    "lenience, expected",
    [
        (0.0, 4),  # everything accepted
        (0.1, 4),  # smallest ratio 0.1667 ≥ 0.1
        (0.5, 2),  # 0.6 ≥ 0.5 accepted, 0.1667 < 0.5 rejected at j = 2
        (0.7, 1),  # 0.6 < 0.7 rejected at j = 1
        (1.0, 1),  # only argmax tokens: j = 0 is the argmax, j = 1 is not
    ],
)
def test_lossy_speculative_accept_length_lenience(lenience, expected):
    n = lossy_speculative_accept_length(DRAFT, BEST, lenience)
    assert n.dtype == torch.int64
    assert n.tolist() == [expected]


@pytest.mark.parametrize(
    "valid, lenience, expected",
    [
        ([True, True, False, False], 0.0, 2),  # n ≤ number of valid drafts
        ([True, True, False, False], 0.5, 2),
        ([True, False, False, False], 0.5, 1),
        ([False, False, False, False], 0.0, 0),
        ([True, True, True, True], 0.5, 2),
    ],
)
def test_lossy_speculative_accept_length_valid_mask(valid, lenience, expected):
    n = lossy_speculative_accept_length(DRAFT, BEST, lenience, valid=torch.tensor([valid]))
    assert n.tolist() == [expected]


def test_lossy_speculative_accept_length_batch_and_first_rejection():
    draft = torch.tensor([[ln(0.1), ln(0.5)], [ln(0.5), ln(0.1)], [ln(0.5), ln(0.5)]])
    best = torch.tensor([[ln(0.5), ln(0.5)], [ln(0.5), ln(0.5)], [ln(0.5), ln(0.5)]])
    assert lossy_speculative_accept_length(draft, best, 0.5).tolist() == [0, 1, 2]


def test_lossy_speculative_accept_length_l1_accepts_argmax_drafts_exactly():
    # Drafts that are the teacher's argmax computed the natural way (gather vs max) must pass at l = 1.
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(8, 5, 32000), dim=-1)
    best, argmax = logp.max(dim=-1)
    draft = logp.gather(-1, argmax.unsqueeze(-1)).squeeze(-1)
    assert lossy_speculative_accept_length(draft, best, 1.0).tolist() == [5] * 8
    # Replace draft 3 by the second-best token: rejected there at l = 1.
    second = logp.topk(2, dim=-1).values[..., 1]
    draft[:, 3] = second[:, 3]
    assert lossy_speculative_accept_length(draft, best, 1.0).tolist() == [3] * 8


@pytest.mark.parametrize("lenience", [-0.1, 1.1])
def test_lossy_speculative_accept_length_rejects_bad_lenience(lenience):
    with pytest.raises(ValueError):
        lossy_speculative_accept_length(DRAFT, BEST, lenience)


def test_lossy_speculative_accept_length_rejects_bad_shapes():
    with pytest.raises(ValueError):
        lossy_speculative_accept_length(DRAFT, BEST[:, :3], 0.5)
    with pytest.raises(ValueError):
        lossy_speculative_accept_length(DRAFT, BEST, 0.5, valid=torch.ones(1, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# 8. reverse_kl / forward_kl
# ---------------------------------------------------------------------------------------------


def _kl_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Position 0: p = P, π = PI_V.  Position 1: p = [0.8, 0.1, 0.1], π = uniform.  Position 2: padding.
    student = torch.tensor([[logits_of(*PI_V), [0.0, 0.0, 0.0], [9.0, -9.0, 0.0]]])
    teacher = torch.tensor([[logits_of(*P), logits_of(0.8, 0.1, 0.1), [-9.0, 9.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    return student, teacher, mask


def test_reverse_kl_explicit_sum():
    student, teacher, mask = _kl_batch()
    second = (1 / 3) * (ln((1 / 3) / 0.8) + 2 * ln((1 / 3) / 0.1))  # π uniform, p = [0.8, 0.1, 0.1]
    assert reverse_kl(student, teacher, mask).item() == pytest.approx((KL_PI_P + second) / 2, abs=1e-6)


def test_forward_kl_explicit_sum():
    student, teacher, mask = _kl_batch()
    second = 0.8 * ln(0.8 * 3) + 2 * 0.1 * ln(0.1 * 3)
    assert forward_kl(student, teacher, mask).item() == pytest.approx((KL_P_PI + second) / 2, abs=1e-6)


def test_reverse_kl_with_call_logit_renormalises_and_differs_from_forward():
    student = torch.tensor([[logits_of(0.2, 0.2, 0.1, 0.5)]])  # π_V = PI_V after dropping <τ>
    teacher = torch.tensor([[logits_of(*P)]])
    mask = torch.ones(1, 1)
    assert reverse_kl(student, teacher, mask).item() == pytest.approx(KL_PI_P, abs=1e-6)
    assert forward_kl(student, teacher, mask).item() == pytest.approx(KL_P_PI, abs=1e-6)
    assert abs(KL_PI_P - KL_P_PI) > 1e-3


def test_reverse_kl_rejects_bad_shapes():
    with pytest.raises(ValueError):
        reverse_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 3))
    with pytest.raises(ValueError):
        reverse_kl(torch.zeros(1, 2, 5), torch.zeros(1, 2, 3), torch.ones(1, 2))


# ---------------------------------------------------------------------------------------------
# 9. confidence_fallback
# ---------------------------------------------------------------------------------------------

CONF = torch.tensor([[ln(0.7), ln(0.2), ln(0.1)], [ln(0.4), ln(0.35), ln(0.25)]])


@pytest.mark.parametrize(
    "threshold, expected",
    [
        (0.5, [False, True]),
        (0.0, [False, False]),
        (0.3, [False, False]),
        (0.8, [True, True]),
        (1.0, [True, True]),
    ],
)
def test_confidence_fallback(threshold, expected):
    out = confidence_fallback(CONF, threshold)
    assert out.dtype == torch.bool
    assert out.tolist() == expected


def test_confidence_fallback_is_strict_at_the_threshold():
    # Top probability exactly 1 (log 0) is not below a threshold of 1: a certain student keeps its token.
    certain = torch.tensor([[0.0, -math.inf, -math.inf]])
    assert confidence_fallback(certain, 1.0).tolist() == [False]
    # Exactly representable 0.5 = 2**-1: not below 0.5, but below 0.5000001.
    half = torch.tensor([[ln(0.5), ln(0.25), ln(0.25)]], dtype=torch.float64)
    assert half.max().exp().item() == 0.5
    assert confidence_fallback(half, 0.5).tolist() == [False]
    assert confidence_fallback(half, 0.5000001).tolist() == [True]


def test_confidence_fallback_rejects_bad_inputs():
    with pytest.raises(ValueError):
        confidence_fallback(CONF.unsqueeze(0), 0.5)
    with pytest.raises(ValueError):
        confidence_fallback(CONF, 1.5)


# ---------------------------------------------------------------------------------------------
# 10. budget_allowance (the test-time hard cap: rounded up vs guaranteed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "budget, length, rounded_up, guaranteed",
    [
        (0.1, 9, 1, 0),  # the short output that goes over b under the rounded-up cap: 1/9 = 11%
        (0.1, 10, 1, 1),
        (0.1, 1, 1, 0),
        (0.1, 19, 2, 1),
        (0.3, 7, 3, 2),  # 2.1
        (0.3, 10, 3, 3),  # 0.3 * 10 = 3.0000000000000004 in floating point
        (0.7, 10, 7, 7),  # 0.7 * 10 = 7.000000000000001
        (0.05, 20, 1, 1),
        (0.05, 19, 1, 0),
        (0.5, 3, 2, 1),
        (0.0, 12, 0, 0),
        (1.0, 7, 7, 7),
        (0.5, 0, 0, 0),
    ],
)
def test_budget_allowance_by_hand(budget, length, rounded_up, guaranteed):
    assert budget_allowance(budget, length, "rounded_up") == rounded_up
    assert budget_allowance(budget, length, "guaranteed") == guaranteed
    assert budget_allowance(budget, length) == rounded_up  # the default rule is unchanged


def test_budget_allowance_rules_are_exact_and_guaranteed_never_exceeds_b():
    assert CAP_RULES == ("rounded_up", "guaranteed")
    for budget in (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0):
        exact_b = Fraction(str(budget))
        previous = {rule: 0 for rule in CAP_RULES}
        for n in range(0, 300):
            up, floor = budget_allowance(budget, n, "rounded_up"), budget_allowance(budget, n, "guaranteed")
            assert up == math.ceil(exact_b * n) and floor == math.floor(exact_b * n)
            assert floor <= exact_b * n < floor + 1 and up - 1 < exact_b * n <= up  # calls/n ≤ b; < b + 1/n
            # Each step adds at most one call, so a policy that always asks meets the allowance exactly.
            for rule, value in (("rounded_up", up), ("guaranteed", floor)):
                assert 0 <= value - previous[rule] <= 1
                previous[rule] = value
            assert isinstance(up, int) and isinstance(floor, int)


def test_budget_allowance_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"cap_rule must be one of \['rounded_up', 'guaranteed'\], got 'floor'"):
        budget_allowance(0.1, 10, "floor")
    for budget in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="budget_cap must lie in"):
            budget_allowance(budget, 10, "guaranteed")
    with pytest.raises(ValueError, match="length must be >= 0"):
        budget_allowance(0.1, -1)


# ---------------------------------------------------------------------------------------------
# The three-pass forms against the textbook ones
# ---------------------------------------------------------------------------------------------


def _random_phase1_batch(seed: int, rows: int = 3, width: int = 5, vocab: int = 7):
    generator = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(rows, width, vocab + 1, generator=generator, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(rows, width, vocab, generator=generator, dtype=torch.float64)
    teacher[0, 1, 2:5] = -math.inf  # some teacher tokens impossible: 0·log 0 = 0
    mask = torch.ones(rows, width, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    calls = torch.rand(rows, width, generator=generator) < 0.4
    return student, teacher, calls, mask


def _textbook_phase1_loss(student, teacher, calls, mask, literal):
    call_nll, kl = phase1_loss_terms(student, teacher)
    if not literal:
        kl = kl - (torch.logsumexp(student[..., :-1], dim=-1) - torch.logsumexp(student, dim=-1))
    per_position = torch.where(calls, call_nll, kl)
    return per_position[mask].mean()


@pytest.mark.parametrize("literal", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phase1_loss_equals_its_textbook_form_with_gradients(seed, literal):
    student, teacher, calls, mask = _random_phase1_batch(seed)
    fast = phase1_loss(student, teacher, calls, mask, literal=literal)
    (fast_grad,) = torch.autograd.grad(fast, student)
    slow = _textbook_phase1_loss(student, teacher, calls, mask, literal)
    (slow_grad,) = torch.autograd.grad(slow, student)
    assert fast.item() == pytest.approx(slow.item(), abs=1e-12)
    assert torch.allclose(fast_grad, slow_grad, atol=1e-12)
    assert slow_grad[~mask].abs().max() == 0 and fast_grad[~mask].abs().max() == 0  # padding learns nothing


@pytest.mark.parametrize("literal", [False, True])
def test_phase1_loss_with_every_position_valid_and_a_given_teacher_distribution(literal):
    # Every position valid: the loss reads the rows as a view (no gather); the oracle hands its distribution on.
    student, teacher, calls, _ = _random_phase1_batch(6)
    everything = torch.ones(calls.shape, dtype=torch.bool)
    given = teacher_distribution(torch.log_softmax(teacher.reshape(-1, teacher.shape[-1]), dim=-1))
    fast = phase1_loss(student, teacher, calls, everything, literal, teacher_log_probs=given)
    (fast_grad,) = torch.autograd.grad(fast, student)
    slow = _textbook_phase1_loss(student, teacher, calls, everything, literal)
    (slow_grad,) = torch.autograd.grad(slow, student)
    assert fast.item() == pytest.approx(slow.item(), abs=1e-12)
    assert torch.allclose(fast_grad, slow_grad, atol=1e-12)


def test_phase1_loss_gradient_by_hand():
    # One imitation position, V = 2: π over V+1 = softmax([0, 0, 0]) = ⅓ each, p = [¾, ¼].
    # ∂/∂s = π − [p, 0] = [⅓ − ¾, ⅓ − ¼, ⅓]; literal: [π_V − p, 0] = [½ − ¾, ½ − ¼, 0]. A call: π − e_τ.
    student = torch.zeros(1, 1, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[logits_of(0.75, 0.25)]], dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.bool)
    cases = [(False, False, [1 / 3 - 0.75, 1 / 3 - 0.25, 1 / 3]), (False, True, [-0.25, 0.25, 0.0]),
             (True, False, [1 / 3, 1 / 3, 1 / 3 - 1])]
    for call, literal, expected in cases:
        loss = phase1_loss(student, teacher, one if call else ~one, one, literal)
        (grad,) = torch.autograd.grad(loss, student)
        assert grad.flatten().tolist() == pytest.approx(expected, abs=1e-12)


def test_teacher_distribution_by_hand():
    # p = [½, ½, 0]: Σ p log p = −ln 2, the impossible token adding 0 (not 0·(−inf) = NaN).
    given = teacher_distribution(torch.tensor([[ln(0.5), ln(0.5), -math.inf]], dtype=torch.float64))
    assert given.probs[0].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert given.negentropy.item() == pytest.approx(-math.log(2), abs=1e-12)


def _textbook_reverse_kl(student, teacher, mask):
    vocab = teacher.shape[-1]
    log_q = torch.log_softmax(student[..., :vocab], dim=-1)
    q = log_q.exp()
    support = q > 0
    diff = torch.where(support, log_q, 0.0) - torch.where(support, torch.log_softmax(teacher, dim=-1), 0.0)
    return (q * diff).sum(dim=-1)[mask].mean()


@pytest.mark.parametrize("with_call_logit", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_reverse_kl_equals_its_textbook_form_with_gradients(with_call_logit, padded):
    student, teacher, _, mask = _random_phase1_batch(7)
    teacher = teacher.clone()
    teacher[0, 1] = 0.0  # no impossible teacher tokens (the reverse KL would be infinite)
    student = student.detach().clone()
    student[1, 0, 3] = -math.inf  # a token the student rules out adds 0
    student = (student if with_call_logit else student[..., :-1].clone()).requires_grad_()
    mask = mask if padded else torch.ones_like(mask)
    fast = reverse_kl(student, teacher, mask)
    (fast_grad,) = torch.autograd.grad(fast, student)
    slow = _textbook_reverse_kl(student, teacher, mask)
    (slow_grad,) = torch.autograd.grad(slow, student)
    assert math.isfinite(fast.item()) and fast.item() == pytest.approx(slow.item(), abs=1e-12)
    assert torch.allclose(fast_grad, slow_grad, atol=1e-12)
    assert fast_grad[~mask].abs().max() == 0 if padded else True  # padding learns nothing
    if with_call_logit:
        assert fast_grad[..., -1].abs().max() == 0  # the <τ> logit is not read


def test_reverse_kl_gradient_by_hand():
    # π = softmax([0, 0]) = [½, ½], p = [¾, ¼]: KL = ½ ln(⅔) + ½ ln 2; ∂KL/∂s_v = π_v (log π_v − log p_v − KL).
    student = torch.zeros(1, 1, 2, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[logits_of(0.75, 0.25)]], dtype=torch.float64)
    loss = reverse_kl(student, teacher, torch.ones(1, 1))
    kl = 0.5 * ln(0.5 / 0.75) + 0.5 * ln(0.5 / 0.25)
    assert loss.item() == pytest.approx(kl, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, student)
    expected = [0.5 * (ln(0.5 / 0.75) - kl), 0.5 * (ln(0.5 / 0.25) - kl)]
    assert grad.flatten().tolist() == pytest.approx(expected, abs=1e-12)
    # A token the teacher rules out that the student does not: infinite.
    assert reverse_kl(student, torch.tensor([[[0.0, -math.inf]]], dtype=torch.float64), torch.ones(1, 1)).item() == math.inf


def test_phase1_loss_with_nothing_valid_is_zero_with_a_graph():
    student = torch.zeros(2, 3, 5, requires_grad=True)
    loss = phase1_loss(student, torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and student.grad.abs().max() == 0


@pytest.mark.parametrize("with_call_logit", [True, False])
def test_fast_kl_equals_the_textbook_kl(with_call_logit):
    student, teacher, _, _ = _random_phase1_batch(3)
    student = student.detach() if with_call_logit else student.detach()[..., :-1]
    expected = teacher_student_kl(teacher, student)
    assert torch.allclose(teacher_student_kl_fast(teacher, student), expected, atol=1e-12)
    given = torch.log_softmax(teacher, dim=-1)
    assert torch.allclose(teacher_student_kl_fast(teacher, student, given), expected, atol=1e-12)


def test_fast_kl_by_hand_with_impossible_tokens_on_both_sides():
    # p = [1, 0, 0] (zeros as −inf), q = [0.4, 0.6, 0] (its 0 a −inf logit where p is 0 too): KL = ln 2.5.
    teacher = torch.tensor([[[0.0, -math.inf, -math.inf]]])
    student = torch.tensor([[[math.log(0.4), math.log(0.6), -math.inf]]])
    assert teacher_student_kl_fast(teacher, student).item() == pytest.approx(math.log(2.5), abs=1e-6)
    # Where p gives mass to a token the student rules out, the KL is infinite.
    assert teacher_student_kl_fast(teacher, torch.tensor([[[-math.inf, 0.0, 0.0]]])).item() == math.inf


def test_fast_kl_refuses_a_student_of_the_wrong_width():
    with pytest.raises(ValueError, match="expected V=3 or V\\+1=4"):
        teacher_student_kl_fast(torch.zeros(1, 2, 3), torch.zeros(1, 2, 6))


@pytest.mark.parametrize("divergence", [reverse_kl, forward_kl])
def test_token_kls_read_valid_positions_only(divergence):
    student, teacher, _, mask = _random_phase1_batch(4)
    student, teacher = student.detach()[..., :-1].clone(), teacher.clone()
    teacher[0, 1] = 0.0  # no impossible teacher tokens here (reverse KL would be infinite)
    expected = torch.stack([divergence(student[b:b + 1, t:t + 1], teacher[b:b + 1, t:t + 1], torch.ones(1, 1))
                            for b, t in mask.nonzero().tolist()]).mean()
    student[~mask], teacher[~mask] = math.nan, math.nan  # what padding holds is never read
    assert divergence(student, teacher, mask).item() == pytest.approx(expected.item(), abs=1e-12)
    assert divergence(student, teacher, torch.zeros_like(mask)).item() == 0.0


def test_precomputed_teacher_log_probs_give_the_same_losses():
    student, teacher, calls, mask = _random_phase1_batch(5)
    teacher[0, 1] = 0.0
    given = torch.log_softmax(teacher[mask], dim=-1)
    for literal in (False, True):
        assert phase1_loss(student, teacher, calls, mask, literal, teacher_log_probs=given).item() == pytest.approx(
            phase1_loss(student, teacher, calls, mask, literal).item(), abs=1e-12)
    assert reverse_kl(student[..., :-1], teacher, mask, given).item() == pytest.approx(
        reverse_kl(student[..., :-1], teacher, mask).item(), abs=1e-12)
    with pytest.raises(ValueError, match=r"teacher_log_probs must be \[N, V\]"):
        phase1_loss(student, teacher, calls, mask, teacher_log_probs=given[1:])
    with pytest.raises(ValueError, match=r"teacher_log_probs must be \[N, V\]"):
        reverse_kl(student[..., :-1], teacher, mask, given[:, 1:])
