"""The maths of Knowledge Distillation with Training Wheels as small pure torch functions.

Every function here is stateless and differentiable where it makes sense, so the trainers,
the environment and the decoders can share one tested implementation.

Conventions
-----------
* Tensors are batch-first: ``[B, T, ...]`` with ``B`` rows (episodes) and ``T`` positions.
* ``V`` is the vocabulary size (the teacher's output layer).  The student's action space has
  ``V + 1`` entries; index ``V`` is the teacher-call action ``<τ>``.
* ``mask`` is a bool (or 0/1 float) ``[B, T]`` tensor of valid positions; padding after the end
  of an episode is False.  Non-zero entries count as valid.

Paper references (arXiv 2502.17717) and where the implementation follows
``shared/docs/notes.md`` rather than the paper's literal equations are given per function.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CAP_RULES",
    "bild_rollback_position",
    "budget_allowance",
    "collm_defers",
    "collm_marginal_nll",
    "collm_pseudo_labels",
    "confidence_fallback",
    "forward_kl",
    "lagrange_step",
    "lossy_speculative_accept_length",
    "oracle_call_mask",
    "pcl_consistency_error",
    "pcl_loss",
    "phase1_loss",
    "phase1_loss_terms",
    "reverse_kl",
    "teacher_student_kl",
    "teacher_student_kl_fast",
    "TeacherDistribution",
    "teacher_distribution",
]


# ---------------------------------------------------------------------------------------------
# Shape helpers
# ---------------------------------------------------------------------------------------------


def _check_2d(name: str, x: Tensor, shape: tuple[int, ...] | None = None) -> None:
    """Raise ValueError unless ``x`` is 2-D (and of ``shape`` when given)."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [B, T] tensor, got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} (same as the other [B, T] inputs)"
        )


def _as_bool_mask(name: str, mask: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Check a ``[B, T]`` mask against ``shape`` and return it as bool (non-zero = valid)."""
    _check_2d(name, mask, shape)
    return mask if mask.dtype == torch.bool else mask != 0


def _check_student_width(student_logits: Tensor, vocab: int) -> None:
    if student_logits.shape[-1] not in (vocab, vocab + 1):
        raise ValueError(
            f"student logits have {student_logits.shape[-1]} entries in the last dimension, "
            f"expected V={vocab} or V+1={vocab + 1} (teacher vocabulary V={vocab})"
        )


def _student_log_probs_over_vocab(student_logits: Tensor, vocab: int) -> Tensor:
    """log π_V: the student's log-distribution renormalised over the first ``vocab`` entries.

    ``student_logits`` is ``[..., V+1]`` (with the <τ> logit last) or ``[..., V]``.  Dropping the
    <τ> logit *before* the log-softmax is exactly renormalising π over V (notes.md item 2).
    """
    _check_student_width(student_logits, vocab)
    return F.log_softmax(student_logits[..., :vocab], dim=-1)


def _check_logits_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """Student and teacher logits must agree on every dimension except the last."""
    if student_logits.dim() < 1 or student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same leading dimensions [B, T]"
        )


def _kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ_v p_v (log p_v − log q_v) over the last dimension, with 0·log 0 = 0.

    Entries with p_v = 0 (a −inf logit) contribute exactly 0 even where q_v = 0 too; without the
    ``where`` that entry would be 0·(−inf − (−inf)) = NaN.
    """
    p = log_p.exp()
    support = p > 0
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    diff = torch.where(support, log_p, zero) - torch.where(support, log_q, zero)
    return (p * diff).sum(dim=-1)


def _mean_or_zero(values: Tensor) -> Tensor:
    """Mean of ``values``; 0 (the empty sum, still in the graph) when there are none."""
    return values.mean() if values.numel() else values.sum()


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the True entries of ``mask``; 0 (not NaN) when nothing is valid."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    total = torch.where(mask, values, zero).sum()
    return total / mask.sum().clamp(min=1).to(values.dtype)


# ---------------------------------------------------------------------------------------------
# 1. Teacher–student KL (Phase 1 ranking and loss; notes.md item 2)
# ---------------------------------------------------------------------------------------------


def teacher_student_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Per-position KL( p ‖ π_V ).

    Args:
        teacher_logits: ``[B, T, V]`` teacher logits; p = softmax(teacher_logits).
        student_logits: ``[B, T, V+1]`` (last entry = <τ>) or ``[B, T, V]`` student logits.
            π_V is the student's distribution renormalised over the V vocabulary entries,
            i.e. the <τ> logit is dropped before the log-softmax.

    Returns:
        ``[B, T]`` tensor of KL divergences (nats), ≥ 0.  Gradients flow into both inputs.
    """
    _check_logits_pair(student_logits, teacher_logits)
    vocab = teacher_logits.shape[-1]
    log_p = F.log_softmax(teacher_logits, dim=-1)
    log_q = _student_log_probs_over_vocab(student_logits, vocab)
    return _kl_from_log_probs(log_p, log_q)


class TeacherDistribution(NamedTuple):
    """The teacher's distribution p at N positions in the three forms the KLs read, computed once
    (:func:`teacher_distribution`); the teacher is fixed, so none of them carries a gradient."""

    log_probs: Tensor  # [N, V] log p
    probs: Tensor  # [N, V] p
    negentropy: Tensor  # [N] Σ_v p_v log p_v, with 0·log 0 = 0


@torch.no_grad()
def teacher_distribution(log_probs: Tensor) -> TeacherDistribution:
    """:class:`TeacherDistribution` from the teacher's log-softmax ``[N, V]``.

    Why: the oracle's KL ranking and the phase-1 loss both read p and Σ p log p; computed here once per
    batch, they are two passes over V instead of five per reader. A −inf log-probability (p = 0) adds 0
    to Σ p log p: it is read as 0 (0·0), not as 0·(−inf) = NaN.
    """
    probs = log_probs.exp()
    negentropy = torch.linalg.vecdot(probs, log_probs)
    if not bool(torch.isfinite(negentropy).all()):  # a −inf log p somewhere: 0·(−inf) = NaN there, so read it as 0
        negentropy = torch.linalg.vecdot(probs, torch.where(probs > 0, log_probs, torch.zeros((), dtype=log_probs.dtype, device=log_probs.device)))
    return TeacherDistribution(log_probs, probs, negentropy)


def _teacher_negentropy(teacher_logits: Tensor, given: Tensor | TeacherDistribution | None = None) -> tuple[Tensor, Tensor]:
    """``(p, Σ_v p_v log p_v)`` of the teacher, with 0·log 0 = 0; no gradient (the teacher is fixed).
    ``given``: its log-softmax, or its whole :class:`TeacherDistribution`, where the caller already has it."""
    if isinstance(given, TeacherDistribution):
        return given.probs, given.negentropy
    with torch.no_grad():
        log_p = F.log_softmax(teacher_logits, dim=-1) if given is None else given
        distribution = teacher_distribution(log_p)
        return distribution.probs, distribution.negentropy


def _cross_term(p: Tensor, student_token_logits: Tensor) -> Tensor:
    """⟨p, s⟩ over V; an entry with p_v = 0 adds 0 even where s_v = −inf (0·(−inf) would be NaN).

    The product is taken first and checked after: a non-finite s_v always leaves a non-finite sum (NaN or
    ±inf), and checking the ``[...]`` sums costs nothing where checking the ``[..., V]`` logits first
    (``isfinite`` over V) took three times as long as the product itself (docs/benchmarks.md).
    """
    p = p.to(student_token_logits.dtype)
    cross = torch.linalg.vecdot(p, student_token_logits)
    if bool(torch.isfinite(cross).all()):
        return cross
    zero = torch.zeros((), dtype=student_token_logits.dtype, device=student_token_logits.device)
    return torch.linalg.vecdot(p, torch.where(p > 0, student_token_logits, zero))


def teacher_student_kl_fast(
    teacher_logits: Tensor, student_logits: Tensor, teacher_log_probs: Tensor | TeacherDistribution | None = None
) -> Tensor:
    """:func:`teacher_student_kl` in three passes over V instead of about ten (equal to float rounding).

    KL(p ‖ π_V) = Σ p log p − ⟨p, s⟩ + logsumexp(s) over the V token logits s, since Σ p = 1: one
    softmax of the teacher, one dot product and one log-sum-exp of the student. Why a second form:
    the oracle ranks every position of a batch by it and the phase-1 loss takes its gradient, and at
    V = 8,000 the textbook form (two log-softmaxes, an ``exp`` and masked differences, each with its
    backward) was a third of a behaviour-cloning step (docs/benchmarks.md). The textbook form stays the
    reference its tests compare this one with. ``teacher_log_probs``: ``log_softmax(teacher_logits)``, or
    its :class:`TeacherDistribution`, where the caller has computed it already (the oracle also reads the
    teacher's log-likelihoods, and hands the distribution on to the phase-1 loss).
    """
    _check_logits_pair(student_logits, teacher_logits)
    vocab = teacher_logits.shape[-1]
    _check_student_width(student_logits, vocab)
    tokens = student_logits[..., :vocab]
    p, negentropy = _teacher_negentropy(teacher_logits, teacher_log_probs)
    return negentropy - _cross_term(p, tokens) + torch.logsumexp(tokens, dim=-1)


# ---------------------------------------------------------------------------------------------
# 2. Oracle call positions (§2.4.1)
# ---------------------------------------------------------------------------------------------


def oracle_call_mask(
    kl: Tensor, mask: Tensor, budgets: Tensor | float, round_up_draws: Tensor | None = None
) -> Tensor:
    """Positions where the Phase-1 oracle calls the teacher: the top ⌊l·b⌋ valid positions by KL.

    Args:
        kl: ``[B, T]`` per-position KL (e.g. from :func:`teacher_student_kl`); NaN is rejected.
        mask: ``[B, T]`` valid positions.
        budgets: ``[B]`` teacher-use budget b ∈ [0, 1] per row (a float applies to every row).
        round_up_draws: optional ``[B]`` uniform draws u ∈ [0, 1) for *stochastic rounding*: a row
            then gets ⌊l·b⌋ + 1{u < l·b − ⌊l·b⌋} calls, whose expectation is exactly l·b. Why: with
            short outputs the floor biases every budget down (l = 8: b = 0.1 gives no call at all,
            so "no" and "light" teach the same thing). ``None`` (the default) is the paper's floor.

    Returns:
        ``[B, T]`` bool tensor.  Per row with l valid positions, exactly ⌊l·b⌋ valid positions are
        True: the highest KL first, ties broken by the earlier position.  Padding is never marked.

    ⌊l·b⌋ is computed in float64 as ``floor(l·b + 1e-6·max(l, 1))``, so that 10 × 0.3
    (= 3.0000000000000004) gives 3 and 10 × 0.7 (≈ 6.9999999) gives 7.  The tolerance grows with l
    because a float32 budget (relative error ≤ 6e-8) times l = 1000 is already 6e-5 off.
    """
    _check_2d("kl", kl)
    valid = _as_bool_mask("mask", mask, tuple(kl.shape))
    rows = kl.shape[0]
    b = torch.as_tensor(budgets, device=kl.device, dtype=torch.float64)
    if b.dim() == 0:
        b = b.expand(rows)
    if tuple(b.shape) != (rows,):
        raise ValueError(f"budgets must have shape [B]=({rows},) or be a scalar, got {tuple(b.shape)}")
    if bool(((b < 0) | (b > 1) | b.isnan()).any()):
        raise ValueError(f"budgets must lie in [0, 1], got {b.tolist()}")
    if bool((kl.isnan() & valid).any()):
        raise ValueError("kl contains NaN at valid positions; cannot rank positions")

    length = valid.sum(dim=1).to(torch.float64)  # l per row
    exact = length * b
    k = torch.floor(exact + 1e-6 * length.clamp(min=1))  # [B] how many calls
    if round_up_draws is not None:
        u = torch.as_tensor(round_up_draws, device=kl.device, dtype=torch.float64)
        if tuple(u.shape) != (rows,) or bool(((u < 0) | (u >= 1) | u.isnan()).any()):
            raise ValueError(f"round_up_draws must be [B]=({rows},) uniform draws in [0, 1), got {u.tolist()}")
        remainder = exact - k
        remainder = torch.where(remainder < 1e-6 * length.clamp(min=1), torch.zeros_like(remainder), remainder)
        k = k + (u < remainder).to(k.dtype)  # a whole l·b (up to the tolerance above) never rounds up
    k = k.long()

    # Lexicographic order (valid first, then KL descending, then position ascending) from two
    # stable sorts: sort by the secondary key, then stably by the primary key.
    order = torch.sort(kl.detach(), dim=1, descending=True, stable=True).indices
    valid_in_order = valid.gather(1, order).to(torch.int8)
    order = order.gather(1, torch.sort(valid_in_order, dim=1, descending=True, stable=True).indices)

    # Rank r in the combined order is selected iff r < k; scatter back to positions.  Since
    # k ≤ l and valid positions come first in the order, padding can never be selected.
    ranks = torch.arange(kl.shape[1], device=kl.device).expand_as(order)
    chosen_in_order = ranks < k.unsqueeze(1)
    out = torch.zeros_like(valid)
    return out.scatter(1, order, chosen_in_order)


# ---------------------------------------------------------------------------------------------
# 3. Phase 1 behaviour cloning (§2.4.1, following the text; notes.md items 1 and 2)
# ---------------------------------------------------------------------------------------------


def _check_phase1_pair(student_logits: Tensor, teacher_logits: Tensor) -> int:
    """Phase 1's logits pair: matching leading dimensions and the <τ> logit on the student's side; V."""
    _check_logits_pair(student_logits, teacher_logits)
    vocab = teacher_logits.shape[-1]
    if student_logits.shape[-1] != vocab + 1:
        raise ValueError(
            f"Phase 1 needs the <τ> logit: student logits must have V+1={vocab + 1} entries, "
            f"got {student_logits.shape[-1]}"
        )
    return vocab


def phase1_loss_terms(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Both per-position Phase-1 loss terms, before the oracle's choice between them.

    Args:
        student_logits: ``[B, T, V+1]``; index V is <τ>.
        teacher_logits: ``[B, T, V]``.

    Returns:
        ``(call_nll, kl)``, each ``[B, T]``: ``call_nll = −log π(<τ>)`` with π over all V+1 actions,
        and ``kl = KL(p ‖ π_V)`` as in :func:`teacher_student_kl`.
    """
    vocab = _check_phase1_pair(student_logits, teacher_logits)
    call_nll = -F.log_softmax(student_logits, dim=-1)[..., vocab]
    return call_nll, teacher_student_kl(teacher_logits, student_logits)


def _rows_at(values: Tensor, valid: Tensor) -> Tensor:
    """``values[valid]`` as ``[N, ...]``; a view when every position is valid (no gather, and no scatter
    of its gradient back into a zero tensor)."""
    return values.reshape(-1, *values.shape[valid.dim():]) if bool(valid.all()) else values[valid]


class _Phase1PerPosition(torch.autograd.Function):
    """The phase-1 loss per position on ``[N, V+1]`` student logits, with its gradient written out.

    Per position, with lse_V and lse_{V+1} the log-sum-exps of the token logits and of all V+1 logits:
    a call costs lse_{V+1} − s_τ; imitation costs Σ p log p − ⟨p, s_V⟩ + lse_{V+1} (``literal``: + lse_V).
    The gradient is a softmax minus the target: π − e_τ at a call, π − [p, 0] for imitation (``literal``:
    [π_V − p, 0]). Why by hand: autograd's backward of the same forward makes about ten passes over V + 1
    (the log-sum-exps', the dot product's, the slices' scatters and their sum); this one makes three, and at
    V = 8,000 the loss and its backward were a third of a behaviour-cloning step (docs/benchmarks.md).
    """

    @staticmethod
    def forward(ctx: Any, student: Tensor, probs: Tensor, negentropy: Tensor, calls: Tensor, literal: bool) -> Tensor:
        vocab = probs.shape[-1]
        tokens, call_logit = student[:, :vocab], student[:, vocab]
        lse_tokens = torch.logsumexp(tokens, dim=-1)
        lse_all = torch.logaddexp(lse_tokens, call_logit)
        imitation = negentropy - _cross_term(probs, tokens) + (lse_tokens if literal else lse_all)
        # torch.where (not a 0/1 blend) so that an infinite unused term cannot turn into NaN.
        per_position = torch.where(calls, lse_all - call_logit, imitation)
        # The normaliser of the softmax in each position's gradient (over V alone for literal imitation).
        normaliser = torch.where(calls, lse_all, lse_tokens) if literal else lse_all
        ctx.save_for_backward(student, probs, calls, normaliser)
        ctx.literal = literal
        return per_position

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        student, probs, calls, normaliser = ctx.saved_tensors
        vocab = probs.shape[-1]
        gradient = torch.sub(student, normaliser[:, None]).exp_()  # the softmax (over V+1, or V: see forward)
        imitating = (~calls).to(probs.dtype)
        gradient[:, :vocab].addcmul_(probs, imitating[:, None], value=-1.0)
        if ctx.literal:
            gradient[:, vocab].mul_(calls.to(gradient.dtype))  # literal imitation does not read s_τ
        gradient[:, vocab].sub_(calls.to(gradient.dtype))
        return gradient.mul_(grad[:, None]), None, None, None, None


def phase1_loss(
    student_logits: Tensor, teacher_logits: Tensor, call_mask: Tensor, mask: Tensor, literal: bool = False,
    teacher_log_probs: Tensor | TeacherDistribution | None = None,
) -> Tensor:
    """Phase-1 behaviour-cloning loss (scalar).

    Follows the text of §2.4.1 (Eq. 16 has its cases swapped, notes.md item 1): at oracle call
    positions the student learns to emit <τ>, elsewhere it imitates the teacher.

    Imitation is KL(p̃ ‖ π) over all V+1 actions, with p̃ the teacher's distribution extended by
    zero mass on <τ>. That equals KL(p ‖ π_V) (the renormalised KL_i of notes.md item 2, which
    ranks the positions) plus −log(1 − π(<τ>)). The extra term is why it is used: with KL(p ‖ π_V)
    alone nothing tells the student *not* to call where the oracle does not, −log π(<τ>) at the
    call positions is the only force on π(<τ>), and the clone drifts to calling everywhere (on
    the embedded task it called on ~47% of tokens at every budget after 200 batches).
    ``literal=True`` gives the paper's literal loss, KL(p ‖ π_V) alone.

    Args:
        student_logits: ``[B, T, V+1]`` student logits on the teacher trajectory (index V = <τ>).
        teacher_logits: ``[B, T, V]``.
        call_mask: ``[B, T]`` oracle call positions (e.g. :func:`oracle_call_mask`); entries at
            padding are ignored.
        mask: ``[B, T]`` valid positions.
        literal: drop the −log(1 − π(<τ>)) term (the paper's literal reading).
        teacher_log_probs: ``[N, V]`` ``log_softmax(teacher_logits)`` at the N valid positions (row-major),
            or its :class:`TeacherDistribution`, where the caller has them (the oracle does); not computed again.

    Returns:
        Scalar: mean over valid positions of ``−log π(<τ>)`` where ``call_mask`` else
        ``KL(p ‖ π_V) − log(1 − π(<τ>))``.  0 when no position is valid.
    """
    vocab = _check_phase1_pair(student_logits, teacher_logits)
    shape = tuple(student_logits.shape[:-1])
    valid = _as_bool_mask("mask", mask, shape)
    calls = _as_bool_mask("call_mask", call_mask, shape)
    # Only the valid positions are read (a padded batch of short outputs is mostly padding), in three passes
    # over V forward and three back (_Phase1PerPosition). Equal to phase1_loss_terms' textbook form to float
    # rounding (a test compares them and their gradients) at a fraction of its cost (docs/benchmarks.md).
    student = _rows_at(student_logits, valid)
    given = teacher_log_probs.log_probs if isinstance(teacher_log_probs, TeacherDistribution) else teacher_log_probs
    if given is not None and given.shape != (student.shape[0], vocab):
        raise ValueError(f"teacher_log_probs must be [N, V] = {[student.shape[0], vocab]} (the valid positions), "
                         f"got {list(given.shape)}")
    teacher = _rows_at(teacher_logits, valid) if given is None else given
    p, negentropy = _teacher_negentropy(teacher, teacher_log_probs)
    per_position = _Phase1PerPosition.apply(student, p.to(student.dtype), negentropy.to(student.dtype),
                                            calls[valid], literal)
    return _mean_or_zero(per_position)


# ---------------------------------------------------------------------------------------------
# 4. Path Consistency Learning (Nachum et al. 2017)
# ---------------------------------------------------------------------------------------------


def pcl_consistency_error(log_pi: Tensor, values: Tensor, rewards: Tensor, mask: Tensor, tau: float, gamma: float = 1.0,
                          horizon: int | None = None, bootstrap: Tensor | None = None) -> Tensor:
    """Soft path-consistency error C_i for the sub-trajectory starting at every position i.

        C_i = −V(s_i) + γ^{d_i} V(s_{i+d_i}) + Σ_{j=0}^{d_i−1} γ^j (r_{i+j} − τ log π(a_{i+j} | s_{i+j}))

    with d_i = min(d, L − i), d = ``horizon`` (None = the whole remaining episode) and L the number
    of valid positions of the row: sub-trajectories are truncated at the episode end, and the value
    after the last valid step is ``bootstrap`` (default 0, i.e. a terminated episode; pass V of the
    next state for an episode that was truncated instead).

    Args:
        log_pi: ``[B, T]`` log π(a_t | s_t) of the actions taken.
        values: ``[B, T]`` V(s_t) of the state before each action.
        rewards: ``[B, T]`` r_t.
        mask: ``[B, T]`` valid positions; must be a prefix of each row (padding only at the end).
        tau: entropy-regularisation temperature τ.
        gamma: discount γ ∈ [0, 1].
        horizon: sub-trajectory length d ≥ 1, or None for the rest of the episode.
        bootstrap: optional ``[B]`` value after the last valid step (default 0).

    Returns:
        ``[B, T]`` C_i; 0 at invalid positions.  Nothing is detached: PCL trains π and V on the same
        squared error (the two networks get separate learning rates in the optimiser).
    """
    valid = _check_pcl_inputs(log_pi, values, rewards, mask, gamma, horizon, bootstrap)
    rows, steps = valid.shape
    d = steps if horizon is None else min(horizon, steps)
    dtype, device = values.dtype, values.device
    zero = torch.zeros((), dtype=dtype, device=device)

    # Per-step soft reward; `where` (not multiplication) so that -inf/NaN in padding cannot leak.
    # Zeros after the episode end make every window sum stop at the end automatically.
    soft_reward = torch.where(valid, rewards - tau * log_pi, zero)
    path_reward = _window_sums(soft_reward, gamma, d)  # [B, T]
    pos = torch.arange(steps, device=device)

    # Value at the end of each window: V(s_{i+d}) inside the episode, the bootstrap at its end.
    length = valid.sum(dim=1, keepdim=True)  # [B, 1] = L
    end = torch.minimum(pos.unsqueeze(0) + d, length)  # [B, T] = i + d_i
    padded_values = torch.cat([values, values.new_zeros(rows, 1)], dim=1)  # index T is a safe dummy
    next_value = padded_values.gather(1, end)
    tail = values.new_zeros(rows) if bootstrap is None else bootstrap.to(dtype)
    next_value = torch.where(end < length, next_value, tail.unsqueeze(1))
    steps_taken = (end - pos.unsqueeze(0)).clamp(min=0).to(dtype)  # d_i (≤ 0 only on padding)
    discount = torch.pow(torch.tensor(gamma, dtype=dtype, device=device), steps_taken)

    error = -values + discount * next_value + path_reward
    return torch.where(valid, error, zero)


def _check_pcl_inputs(
    log_pi: Tensor, values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, horizon: int | None,
    bootstrap: Tensor | None,
) -> Tensor:
    """The shape and range checks of :func:`pcl_consistency_error`; the ``[B, T]`` bool mask of valid positions."""
    _check_2d("log_pi", log_pi)
    shape = tuple(log_pi.shape)
    _check_2d("values", values, shape)
    _check_2d("rewards", rewards, shape)
    valid = _as_bool_mask("mask", mask, shape)
    rows, steps = shape
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1):
        raise ValueError(f"horizon must be a positive int or None, got {horizon!r}")
    if steps > 1 and bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("mask must mark a prefix of each row as valid (padding only after the episode end)")
    if bootstrap is not None and tuple(bootstrap.shape) != (rows,):
        raise ValueError(f"bootstrap must have shape [B]=({rows},), got {tuple(bootstrap.shape)}")
    return valid


def _window_sums(u: Tensor, gamma: float, d: int) -> Tensor:
    """Windowed discounted sums Σ_{j<d} γ^j u_{i+j} ``[B, T]`` for every start i of ``u`` ``[B, T]``.

    All at once as u @ Wᵀ with the banded matrix W[i, k] = γ^{k−i} for i ≤ k < i+d.  O(T²) but one
    matmul, and it avoids dividing a γ^k-weighted prefix sum by γ^i, which underflows for long
    episodes with γ < 1.
    """
    dtype, device = u.dtype, u.device
    zero = torch.zeros((), dtype=dtype, device=device)
    pos = torch.arange(u.shape[1], device=device)
    offset = pos.unsqueeze(0) - pos.unsqueeze(1)  # offset[i, k] = k − i
    in_window = (offset >= 0) & (offset < d)
    window = torch.where(
        in_window,
        torch.pow(torch.tensor(gamma, dtype=dtype, device=device), offset.clamp(min=0).to(dtype)),
        zero,
    )
    return u @ window.T


def pcl_loss(log_pi: Tensor, values: Tensor, rewards: Tensor, mask: Tensor, tau: float, gamma: float = 1.0,
             horizon: int | None = None, bootstrap: Tensor | None = None) -> Tensor:
    """PCL loss (scalar): Σ_i ½ C_i² over the valid start positions of each row, averaged over rows.

    Normalisation: the sum over positions is divided by B (the number of rows, including rows
    with no valid positions), not by the number of valid positions, as in Nachum et al. (2017)
    where each episode contributes the sum over its sub-trajectories.  Arguments and shapes are
    those of :func:`pcl_consistency_error`.
    """
    error = pcl_consistency_error(log_pi, values, rewards, mask, tau, gamma, horizon, bootstrap)
    return 0.5 * error.pow(2).sum() / max(error.shape[0], 1)


# ---------------------------------------------------------------------------------------------
# 5. Lagrange multipliers per budget (§2.4.2; notes.md item 7)
# ---------------------------------------------------------------------------------------------


def lagrange_step(
    lambdas: dict[float, float],
    teacher_fractions: dict[float, float],
    lr: float = 1e-2,
    cap: float = 2.0,
    floor: float = 0.0,
) -> dict[float, float]:
    """One dual step per budget: λ_b ← clip(λ_b + lr·(f_b − b), floor, cap).

    Args:
        lambdas: current λ_b per budget b.
        teacher_fractions: measured teacher fraction f_b ∈ [0, 1] of recent on-policy rollouts,
            for some (or all) of the budgets in ``lambdas``.
        lr: dual learning rate (paper: 1e-2).
        cap: upper clip of λ (paper: 2).
        floor: lower clip of λ. The paper's 0 treats b as a ceiling (f ≤ b); a negative floor
            treats it as a target (f = b): under-use then lowers λ below 0 and Eq. 17 pays for
            calls. Why: even at λ = 0 a call earns 0 while a confident, correct student token earns
            (log p − μ_r)/σ_r > 0, so a policy can sit below a high budget with nothing pushing up.

    Returns:
        A new dict; budgets without a measured fraction keep their λ.  The inputs are not modified.
    """
    if lr < 0:
        raise ValueError(f"lr must be ≥ 0, got {lr}")
    if cap < 0 or floor > cap:
        raise ValueError(f"need floor ≤ cap and cap ≥ 0, got floor={floor} and cap={cap}")
    updated = dict(lambdas)
    for budget, fraction in teacher_fractions.items():
        if budget not in lambdas:
            raise ValueError(
                f"budget {budget!r} has a teacher fraction but no λ; known budgets: {sorted(lambdas)}"
            )
        # `not (0 <= f <= 1)` also rejects NaN.
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"teacher fraction for budget {budget!r} must lie in [0, 1], got {fraction!r}")
        # Excess teacher use (f > b) raises λ, making teacher calls costlier in the Eq. 17 reward.
        updated[budget] = min(max(lambdas[budget] + lr * (fraction - budget), floor), cap)
    return updated


# ---------------------------------------------------------------------------------------------
# 7. Lossy greedy speculative decoding, acceptance (Appendix 5.3, Algorithm 1 line 6)
# ---------------------------------------------------------------------------------------------


def lossy_speculative_accept_length(
    draft_teacher_logprobs: Tensor,
    teacher_max_logprobs: Tensor,
    lenience: float,
    valid: Tensor | None = None,
) -> Tensor:
    """Number of accepted draft tokens: n = min({j : p(x_j) < l·p(x̂_j)} ∪ {K}).

    Args:
        draft_teacher_logprobs: ``[B, K]`` teacher log p(x_j) of each draft token.
        teacher_max_logprobs: ``[B, K]`` teacher log p(x̂_j) of its argmax at the same position.
        lenience: l ∈ [0, 1].  l = 0 accepts every draft; l = 1 accepts only teacher-argmax tokens.
        valid: optional ``[B, K]`` bool, False for draft slots a row does not have; the first
            invalid slot ends the draft, so n never exceeds the number of (leading) valid drafts.

    Returns:
        ``[B]`` int64 accept lengths in [0, K].  n = K means full acceptance (the caller then takes
        the teacher's next token for free); otherwise the caller replaces draft n by x̂_n.

    The test is done in log space, log p(x_j) < log l + log p(x̂_j), which is the probability-space
    test without underflow.  log 1 = 0 exactly, so with l = 1 a draft that *is* the argmax (identical
    log-prob) is accepted; log 0 = −inf, so with l = 0 nothing is rejected.
    """
    _check_2d("draft_teacher_logprobs", draft_teacher_logprobs)
    shape = tuple(draft_teacher_logprobs.shape)
    _check_2d("teacher_max_logprobs", teacher_max_logprobs, shape)
    if not 0.0 <= lenience <= 1.0:
        raise ValueError(f"lenience must lie in [0, 1], got {lenience}")
    log_l = math.log(lenience) if lenience > 0 else -math.inf
    reject = draft_teacher_logprobs < teacher_max_logprobs + log_l
    if valid is not None:
        reject = reject | ~_as_bool_mask("valid", valid, shape)
    # Accept length = number of leading non-rejected slots.
    return (~reject).long().cumprod(dim=1).sum(dim=1)


# ---------------------------------------------------------------------------------------------
# 8. Token-level KLs for the GKD / DistillSpec baselines
# ---------------------------------------------------------------------------------------------


class _ReverseKLPerPosition(torch.autograd.Function):
    """KL(π ‖ p) per position for ``[N, V]`` student logits and the teacher's log-probabilities, with its
    gradient written out: ∂KL/∂s_v = π_v (log π_v − log p_v − KL). Why by hand: autograd's backward of the
    textbook form runs about nine passes over V (the log-softmax's, the ``exp``'s, the masked difference's
    and the product's); this one runs three on what the forward kept, and at V = 8,000 the reverse KL and its
    backward were more than half of a GKD batch (docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher_log_probs: Tensor) -> Tensor:
        log_q = F.log_softmax(student, dim=-1)
        q = log_q.exp()
        difference = log_q.sub_(teacher_log_probs)  # log π − log p, in log π's buffer
        kl = torch.linalg.vecdot(q, difference)
        if not bool(torch.isfinite(kl).all()):  # (any non-finite difference leaves its row's sum non-finite)
            # π_v = 0 adds 0 (0·log 0 = 0), where the difference may be −inf − (−inf) = NaN; a token the
            # teacher rules out and the student does not makes the KL +inf, as it should.
            difference = torch.where(q > 0, difference, torch.zeros((), dtype=q.dtype, device=q.device))
            kl = torch.linalg.vecdot(q, difference)
        ctx.save_for_backward(q, difference, kl)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        q, difference, kl = ctx.saved_tensors
        gradient = torch.sub(difference, kl[:, None]).mul_(q)
        return gradient.mul_(grad[:, None]), None


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, teacher_log_probs: Tensor | None = None) -> Tensor:
    """Token-wise reverse KL( π ‖ p ) averaged over valid tokens (scalar).

    Args:
        student_logits: ``[B, T, V]`` (or ``[B, T, V+1]``: the <τ> logit is dropped and π
            renormalised over V).
        teacher_logits: ``[B, T, V]``.
        mask: ``[B, T]`` valid positions.
        teacher_log_probs: ``[N, V]`` ``log_softmax(teacher_logits)`` at the N valid positions (row-major),
            where the caller has them (GKD's updates reuse one batch's); not computed again.

    Returns:
        Scalar mean over valid positions of Σ_v π_v (log π_v − log p_v); 0 when nothing is valid.
    """
    _check_logits_pair(student_logits, teacher_logits)
    vocab = teacher_logits.shape[-1]
    _check_student_width(student_logits, vocab)
    # The valid positions only: every pass over V skips padding; the per-position KL and its gradient in a few
    # passes (_ReverseKLPerPosition), equal to the textbook form to float rounding (tests/test_objectives.py).
    valid = _as_bool_mask("mask", mask, tuple(student_logits.shape[:-1]))
    student = _rows_at(student_logits, valid)[:, :vocab]
    if teacher_log_probs is not None and teacher_log_probs.shape != student.shape:
        raise ValueError(f"teacher_log_probs must be [N, V] = {list(student.shape)} (the valid positions), "
                         f"got {list(teacher_log_probs.shape)}")
    log_p = F.log_softmax(_rows_at(teacher_logits, valid), dim=-1) if teacher_log_probs is None else teacher_log_probs
    return _mean_or_zero(_ReverseKLPerPosition.apply(student, log_p.to(student.dtype)))


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Token-wise forward KL( p ‖ π ) averaged over valid tokens (scalar).

    Same arguments as :func:`reverse_kl`; per token this is :func:`teacher_student_kl`.
    """
    _check_logits_pair(student_logits, teacher_logits)
    valid = _as_bool_mask("mask", mask, tuple(student_logits.shape[:-1]))
    return _mean_or_zero(teacher_student_kl(teacher_logits[valid], student_logits[valid]))


# ---------------------------------------------------------------------------------------------
# 9. Big Little Decoder fallback
# ---------------------------------------------------------------------------------------------


def confidence_fallback(student_logprobs_over_V: Tensor, threshold: float) -> Tensor:
    """Big Little Decoder's fallback rule: hand the token to the teacher when the student is unsure.

    Args:
        student_logprobs_over_V: ``[B, V]`` student log-probabilities over the vocabulary.
        threshold: α ∈ [0, 1]; 0 never falls back, 1 always does unless the top probability is 1.

    Returns:
        ``[B]`` bool, True where max_v π_v < threshold.
    """
    if student_logprobs_over_V.dim() != 2:
        raise ValueError(
            f"student_logprobs_over_V must be [B, V], got shape {tuple(student_logprobs_over_V.shape)}"
        )
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    # The top probability is ≥ 1/V, so exponentiating the max log-prob cannot underflow.
    return student_logprobs_over_V.max(dim=-1).values.exp() < threshold


# ---------------------------------------------------------------------------------------------
# 10. The test-time budget cap (agents.decoding.teacher_help_decode)
# ---------------------------------------------------------------------------------------------

CAP_RULES = ("rounded_up", "guaranteed")
"""The two hard budget caps: ``"rounded_up"`` allows ⌈b·n⌉ calls, ``"guaranteed"`` ⌊b·n⌋."""

# b·n that is an integer in decimal (0.3·10) may be 3.0000000000000004 or 2.9999999999999996 in
# binary floating point; within this slack of an integer it is taken as that integer, so that
# ⌈b·n⌉ allows no call too many and ⌊b·n⌋ none too few.
_BUDGET_SLACK = 1e-9


def budget_allowance(budget_cap: float, length: int, cap_rule: str = "rounded_up") -> int:
    """The most teacher calls a prefix of ``length`` output tokens may hold under the hard cap b.

    A capped decoder allows <τ> at the step that would produce output token n (1-based) only if
    calls_so_far + 1 ≤ ``budget_allowance(b, n)``, so every prefix, and hence the whole output,
    holds at most the allowance of its length. The two rules (:data:`CAP_RULES`):

    - ``"rounded_up"``: ⌈b·n⌉. Any b > 0 allows a call at the very first token, and an output of n
      tokens may exceed b by less than one call: teacher fraction < b + 1/n (b = 0.1 and a 9-token
      output: 1 call, 11%). A cap on the *rate*, not a guarantee on each output.
    - ``"guaranteed"``: ⌊b·n⌋. Every output of any length n has calls ≤ ⌊b·n⌋ ≤ b·n, i.e. teacher
      fraction ≤ b, whatever token ends it: the cap holds at every prefix, and the decision at token
      n + 1 is taken before it is known whether that token is the last. The price: no call before
      b·n reaches 1 (b = 0.1: none in the first 9 tokens).

    Both agree wherever b·n is an integer. A b·n within ``_BUDGET_SLACK`` (1e-9) of an integer is
    taken as that integer (b = 0.3, n = 10 gives 3 under both rules, although 0.3·10 is
    3.0000000000000004 in binary floating point).

    Args:
        budget_cap: b ∈ [0, 1].
        length: n ≥ 0, the prefix length in output tokens.
        cap_rule: ``"rounded_up"`` (the default) or ``"guaranteed"``.

    Returns:
        The allowance, an int in [0, n].

    Examples (by hand): b = 0.1: n = 9 → 1 rounded up, 0 guaranteed; n = 10 → 1 and 1. b = 0.3,
    n = 7 → 3 and 2. b = 0 → 0 and b = 1 → n under both rules.
    """
    if cap_rule not in CAP_RULES:
        raise ValueError(f"cap_rule must be one of {list(CAP_RULES)}, got {cap_rule!r}")
    # `not (0 <= b <= 1)` also rejects NaN.
    if not 0.0 <= budget_cap <= 1.0:
        raise ValueError(f"budget_cap must lie in [0, 1], got {budget_cap!r}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    exact = budget_cap * length
    if cap_rule == "rounded_up":
        return math.ceil(exact - _BUDGET_SLACK)
    return math.floor(exact + _BUDGET_SLACK)


# ---------------------------------------------------------------------------------------------
# 11. The published token routers (agents.routers): Co-LLM's learnt deferral, BiLD's rollback
# ---------------------------------------------------------------------------------------------


def collm_marginal_nll(
    deferral_logits: Tensor, student_target_logprobs: Tensor, teacher_target_logprobs: Tensor, mask: Tensor
) -> Tensor:
    """Co-LLM's training loss (Shen et al., ACL 2024, Eq. 2; ``DeferralTrainerV1`` in clinicalml/co-llm):
    the negative marginal log-likelihood of the reference tokens with the latent Z_t (who writes token t)
    summed out, averaged over the valid tokens.

        −log p(x_t) = −logsumexp( log σ(−d_t) + log p_student(x_t),  log σ(d_t) + log p_teacher(x_t) )

    No label says who should write: the gradient pushes σ(d_t) up where the teacher gives the reference
    token the higher probability. The teacher is frozen (its log-probabilities are data); the student's
    log-probabilities carry gradients when the student is fine-tuned with the router.

    Args:
        deferral_logits: ``[B, T]`` d_t, the router's logit of P(Z_t = 1) (the teacher writes).
        student_target_logprobs: ``[B, T]`` log p_student(x_t | x_<t) over V.
        teacher_target_logprobs: ``[B, T]`` log p_teacher(x_t | x_<t).
        mask: ``[B, T]`` the reference tokens (padding False).

    Returns:
        The scalar mean over valid tokens (0 when none is valid).

    By hand: d = 0 (σ = ½), p_student = 0.2, p_teacher = 0.6 → −log(½·0.2 + ½·0.6) = −log 0.4.
    """
    _check_2d("deferral_logits", deferral_logits)
    shape = tuple(deferral_logits.shape)
    _check_2d("student_target_logprobs", student_target_logprobs, shape)
    _check_2d("teacher_target_logprobs", teacher_target_logprobs, shape)
    valid = _as_bool_mask("mask", mask, shape)
    both = torch.stack([F.logsigmoid(-deferral_logits) + student_target_logprobs,
                        F.logsigmoid(deferral_logits) + teacher_target_logprobs.to(deferral_logits.dtype)], dim=-1)
    return _masked_mean(-torch.logsumexp(both, dim=-1), valid)


def collm_pseudo_labels(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
    """The labels Co-LLM's deferral head is initialised on (``collm/dataset/initialization.py``): 1 where
    the teacher's argmax is the reference token and the student's is not, else 0.

    Args:
        student_logits, teacher_logits: ``[B, T, V]`` next-token logits at each reference position.
        targets: ``[B, T]`` the reference tokens.

    Returns:
        ``[B, T]`` float labels in {0, 1}.
    """
    if student_logits.dim() != 3 or teacher_logits.shape != student_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must both be [B, T, V], got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    _check_2d("targets", targets, tuple(student_logits.shape[:2]))
    teacher_right = teacher_logits.argmax(dim=-1) == targets
    student_right = student_logits.argmax(dim=-1) == targets
    return (teacher_right & ~student_right).float()


def collm_defers(deferral_logits: Tensor, threshold: float) -> Tensor:
    """Co-LLM's decision at test time: the teacher writes the token where P(Z_t = 1) = σ(d_t) > η.

    η = 1 never defers, η = 0 defers unless σ(d_t) is exactly 0. Compared in logit space (d > logit η),
    which is the probability test without σ saturating at 1 for large d.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the deferral threshold η must lie in [0, 1], got {threshold}")
    if threshold >= 1.0:
        return torch.zeros_like(deferral_logits, dtype=torch.bool)
    if threshold <= 0.0:
        return deferral_logits > -math.inf
    return deferral_logits > math.log(threshold) - math.log1p(-threshold)


def bild_rollback_position(
    teacher_target_nll: Tensor, valid: Tensor, threshold: float, large_argmax: Tensor | None = None
) -> Tensor:
    """Big Little Decoder's rollback (Kim et al., NeurIPS 2023, §3.3; ``T5BiLDModel._greedy_search_body``):
    the first of the small model's tokens since the large model's last pass whose negative log-likelihood
    under the large model exceeds α_RB. That token and every one after it are discarded (wasted) and the
    large model's argmax takes its place.

    Args:
        teacher_target_nll: ``[B, K]`` −log p_large(s_j | prefix) of the small tokens s_1 … s_K of each row.
        valid: ``[B, K]`` bool, the tokens a row has (a row drafts K_b ≤ K; its later slots are False).
        threshold: α_RB ≥ 0 (nats; the official default 5, its README sweeps 2–5).
        large_argmax: optional ``[B, K]`` bool, True where s_j is the large model's own argmax. Such a
            token is never rolled back: its replacement would be itself. (The official loop finds the
            first token over α_RB and, if the large model's argmax there is that token, skips the rollback
            and checks no later token; here the later tokens are still checked.)

    Returns:
        ``[B]`` int64 j in [0, K_b]: tokens s_1 … s_j are kept; j = K_b means no rollback.

    By hand: NLLs [0.1, 6.0, 0.2] with α_RB = 5 → 1 (s_1 kept, s_2 and s_3 wasted); α_RB = 7 → 3;
    α_RB = 0 → 0, unless s_1 is the large model's argmax (then 1, where s_2 is not).
    """
    _check_2d("teacher_target_nll", teacher_target_nll)
    shape = tuple(teacher_target_nll.shape)
    valid = _as_bool_mask("valid", valid, shape)
    if not threshold >= 0:
        raise ValueError(f"the rollback threshold α_RB must be >= 0 nats, got {threshold}")
    rejected = (teacher_target_nll > threshold) & valid
    if large_argmax is not None:
        rejected &= ~_as_bool_mask("large_argmax", large_argmax, shape)
    # The valid slots are leading: K_b of them. A row without a rejection keeps them all.
    kept = valid.long().sum(dim=1)
    first = torch.where(rejected.any(dim=1), rejected.float().argmax(dim=1), kept)
    return first
