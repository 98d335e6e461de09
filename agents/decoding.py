"""Test-time decoders, batched and greedy: Training Wheels, each model alone, lossy speculative
decoding (Appendix 5.3, Algorithm 1) and Big Little Decoder's confidence fallback.

Every decoder takes a batch of tokenised prompts (``input_ids [B, L]``, ``attention_mask [B, L]``,
right-padded) and ``max_new_tokens``, decodes greedily under ``torch.no_grad()`` with KV caches on
both sides (the family's incremental decoder: :class:`~tw_env.incremental.IncrementalDecoder` for
T5, :class:`~tw_env.causal_incremental.CausalIncrementalDecoder` for causal LMs; a prefix is never
re-run), stops as soon as every row has produced EOS and returns a :class:`DecodeResult`.

Both models of a pair must be of one family (:func:`~tw_env.families.check_same_family`) and share
the vocabulary. What a model reads first comes from the family seam
(:meth:`~tw_env.families.ModelFamily.restart_batch`): T5's encoder reads the prompt and its decoder
starts from ``decoder_start_token_id``; a causal LM has its prompt but the last token prefilled into
its cache, and its first step reads that last token (so it yields p(x_1 | prompt)). Each row keeps
its own positions, so rows with prompts of different lengths decode as they would alone.

Where the time goes (what these functions count, so that latency can be compared):

- Training Wheels (:func:`teacher_help_decode`): one student forward per output token. The teacher
  is idle until some row emits <τ>; it then reads, in one forward, every X^(out) token it has not seen
  yet (the same number for every row: rows advance in lock step) and the calling rows take its argmax.
  No teacher call, no teacher compute (not even its encoder). No token is ever wasted.
- Lossy speculative decoding (:func:`speculative_decode`): per cycle K student forwards and one
  teacher forward over K+1 positions; rejected drafts are wasted and both caches are rolled back.
- Confidence fallback (:func:`confidence_fallback_decode`): as Training Wheels, but the student's
  top probability, not a learnt <τ> action, decides when the teacher takes over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from agents.objectives import (
    CAP_RULES,
    budget_allowance,
    confidence_fallback,
    lossy_speculative_accept_length,
    teacher_student_kl,
)
from agents.policy import StudentPolicy, call_log_probability, choose_actions
from tw_env.families import IncrementalDecoding, check_same_family, family_of
from tw_env.models import check_same_vocabulary, generation_model, output_vocab_size


@dataclass
class DecodeResult:
    """What a decoder produced, per row of the batch, and what it cost.

    Attributes:
        output_ids: per row, the output tokens X^(out) up to and including EOS (no decoder start
            token, no padding).
        from_teacher: per row and output token, whether the teacher produced it (a <τ> call, a
            fallback, a speculative replacement or bonus token, or every token of the teacher alone).
        teacher_calls: per row, the number of output tokens taken from the teacher.
        teacher_forwards: teacher decoder forwards run for the whole batch (one per catch-up or
            verification; one per token for the teacher alone); 0 when the teacher never ran.
        wasted_tokens: per row, draft tokens the student produced that the teacher rejected (only
            speculative decoding wastes any).
        student_forwards: student decoder forwards run for the whole batch.
        same_decisions: Training Wheels' greedy decoder only (else None): the range [lo, hi) of
            log call thresholds log c under which every call decision of this decode comes out the
            same (lo: the highest log π(<τ>) where a live row did not call, hi: the lowest where one
            did). Decoding is deterministic, so any threshold in it reproduces this result exactly:
            a threshold search reuses it instead of decoding again
            (:class:`~agents.evaluation.ThresholdDecodes`).
    """

    output_ids: list[list[int]]
    from_teacher: list[list[bool]]
    teacher_calls: list[int]
    teacher_forwards: int
    wasted_tokens: list[int]
    student_forwards: int = 0
    same_decisions: tuple[float, float] | None = None

    @property
    def teacher_fraction(self) -> list[float]:
        """Per row, teacher tokens / output length (0 for an empty output)."""
        return [
            calls / len(ids) if ids else 0.0
            for calls, ids in zip(self.teacher_calls, self.output_ids, strict=True)
        ]

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.output_ids]


def decode_text(result: DecodeResult, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The output of every row as text (special tokens such as EOS skipped)."""
    return tokenizer.batch_decode(result.output_ids, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------- plumbing


def _as_model(model: PreTrainedModel | StudentPolicy) -> PreTrainedModel:
    # A GKD student may come wrapped in a StudentPolicy; its LM head over V is the model's own.
    return model.model if isinstance(model, StudentPolicy) else model


def _eos_ids(model: PreTrainedModel, device: torch.device) -> torch.Tensor:
    eos = model.config.eos_token_id
    if eos is None:
        raise ValueError("the model config has no eos_token_id")
    return torch.as_tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=device)


def _pad_id(model: PreTrainedModel) -> int:
    pad = model.config.pad_token_id
    return 0 if pad is None else int(pad)


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Dropout off while decoding; every submodule's training flag is restored afterwards."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> None:
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, L], got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


class _Outputs:
    """Per-row output buffer ``[B, max_new_tokens]`` with lengths, teacher flags and EOS tracking."""

    def __init__(self, batch_size: int, max_new_tokens: int, pad_id: int, eos: torch.Tensor) -> None:
        device = eos.device
        self.tokens = torch.full((batch_size, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.teacher = torch.zeros(batch_size, max_new_tokens, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.done = torch.full((batch_size,), max_new_tokens == 0, dtype=torch.bool, device=device)  # nothing to add
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.pad_id = pad_id

    def append(self, token: torch.Tensor, from_teacher: torch.Tensor) -> None:
        """Append one token ``[B]`` to every live row (rows advance in lock step)."""
        self.append_block(token[:, None], torch.ones_like(token), from_teacher[:, None])

    def emit(self, token: torch.Tensor, from_teacher: torch.Tensor) -> torch.Tensor:
        """Append one token ``[B]`` per row, padding for finished rows; returns the tokens appended."""
        token = torch.where(self.done, torch.full_like(token, self.pad_id), token)
        self.append(token, from_teacher)
        return token

    def append_block(self, block: torch.Tensor, count: torch.Tensor, from_teacher: torch.Tensor) -> None:
        """Append the first ``count[b]`` tokens of ``block[b]`` (``[B, k]``) to every live row b.

        The caller cuts ``count`` at the first EOS and at ``max_new_tokens``, so a row is finished
        exactly when its last appended token is EOS or it has reached ``max_new_tokens``.
        """
        live = ~self.done
        column = torch.arange(block.shape[1], device=block.device)
        take = (column[None, :] < count[:, None]) & live[:, None]
        rows, cols = torch.nonzero(take, as_tuple=True)
        self.tokens[rows, self.lengths[rows] + cols] = block[rows, cols]
        self.teacher[rows, self.lengths[rows] + cols] = from_teacher[rows, cols]
        self.lengths += take.sum(dim=1)
        last = block.gather(1, (count - 1).clamp(min=0)[:, None]).squeeze(1)
        ended = torch.isin(last, self.eos) | (self.lengths >= self.max_new_tokens)
        self.done |= live & (count > 0) & ended

    def result(
        self, teacher_forwards: int, student_forwards: int, wasted: torch.Tensor | None = None
    ) -> DecodeResult:
        lengths = self.lengths.tolist()
        tokens, teacher = self.tokens.tolist(), self.teacher.tolist()
        out = [row[:n] for row, n in zip(tokens, lengths, strict=True)]
        flags = [row[:n] for row, n in zip(teacher, lengths, strict=True)]
        wasted_list = [0] * len(out) if wasted is None else wasted.tolist()
        return DecodeResult(
            output_ids=out,
            from_teacher=flags,
            teacher_calls=[sum(f) for f in flags],
            teacher_forwards=teacher_forwards,
            wasted_tokens=wasted_list,
            student_forwards=student_forwards,
        )



def _start_pair(
    model: PreTrainedModel | StudentPolicy, teacher: PreTrainedModel, input_ids: torch.Tensor,
    attention_mask: torch.Tensor, max_new_tokens: int, role: str = "student",
) -> tuple[PreTrainedModel, torch.Tensor, torch.Tensor, _Outputs]:
    """What every decoder of a small model with the teacher does first: the small LM (a StudentPolicy's own),
    the pair checked (one family, one vocabulary; ``role`` names the small model in messages), the prompts
    on its device and an empty output buffer."""
    small = _as_model(model)
    check_same_family(teacher, small, role)
    check_same_vocabulary(teacher, output_vocab_size(small), role)
    device = small.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    out = _Outputs(input_ids.shape[0], max_new_tokens, _pad_id(small), _eos_ids(small, device))
    return small, input_ids, attention_mask, out


class _CatchUpTeacher:
    """The teacher at test time: idle until asked, then one forward over everything it has not seen.

    All rows advance together, so when output token n is wanted the teacher's decoder input is
    ``[first, x_0, …, x_{n-1}]`` for every row (finished rows hold padding there) and the unseen part
    has the same length for every row. ``first`` is T5's start token or a causal teacher's last prompt
    token. The prompt is read at the first request only (T5's encoder; a causal teacher's prefill of
    its prompt minus the last token, which the catch-up forward then reads first).
    """

    def __init__(
        self, teacher: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_len: int
    ) -> None:
        self.teacher = teacher
        self.family = family_of(teacher)
        self.input_ids, self.attention_mask, self.first = self.family.restart_batch(teacher, input_ids, attention_mask)
        self.max_len = max_len
        self.decoder: IncrementalDecoding | None = None
        self.seen = 0  # decoder inputs consumed so far (the same for every row)
        self.forwards = 0

    def next_logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``[B, V]`` for the token after ``outputs`` (``[B, n]`` X^(out) so far)."""
        batch_size = outputs.shape[0]
        if self.decoder is None:
            self.decoder = self.family.incremental_decoder(self.teacher, batch_size, self.max_len + 1)
            self.decoder.restart(torch.arange(batch_size), self.input_ids, self.attention_mask)
        decoder_inputs = torch.cat([self.first[:, None].to(outputs.device), outputs], dim=1)
        unseen = decoder_inputs[:, self.seen :].to(self.decoder.device)
        states = self.decoder.step(input_ids=unseen)  # [B, k, d], one forward however many tokens
        self.seen = decoder_inputs.shape[1]
        self.forwards += 1
        return self.decoder.logits(states[:, -1]).float()

    def replace(self, token: torch.Tensor, call: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """``token`` ``[B]`` with the teacher's argmax after ``outputs`` where ``call``; the teacher runs
        only when some row calls."""
        if not bool(call.any()):
            return token
        teacher_token = self.next_logits(outputs).argmax(dim=-1).to(token.device)
        return torch.where(call, teacher_token, token)


# --------------------------------------------------------------------------------------------- Training Wheels


@dataclass(frozen=True)
class _CallRule:
    """Where a Training Wheels step lets the teacher write (the arguments of :func:`teacher_help_decode`)."""

    budget_cap: float | None
    cap_rule: str
    call_threshold: float
    kl_oracle_threshold: float | None

    def __post_init__(self) -> None:
        if self.budget_cap is not None and not 0.0 <= self.budget_cap <= 1.0:
            raise ValueError(f"budget_cap must lie in [0, 1], got {self.budget_cap}")
        if self.cap_rule not in CAP_RULES:
            raise ValueError(f"cap_rule must be one of {list(CAP_RULES)}, got {self.cap_rule!r}")
        if not 0.0 <= self.call_threshold <= 1.0:
            raise ValueError(f"call_threshold must be a probability in [0, 1], got {self.call_threshold}")
        if self.kl_oracle_threshold is not None and not self.kl_oracle_threshold >= 0:
            raise ValueError(f"kl_oracle_threshold must be >= 0 nats (or None), got {self.kl_oracle_threshold}")

    def apply_cap(self, logits: torch.Tensor, out: _Outputs, n: int) -> None:
        """Under the cap, set the <τ> logit (``logits [B, V+1]``, in place) to −inf in every row whose
        next call would exceed the allowance of output token n+1."""
        if self.budget_cap is None:
            return
        vocab = logits.shape[1] - 1
        # Every live row has produced n tokens, so the token now chosen is number n+1.
        over = out.teacher.sum(dim=1) + 1 > budget_allowance(self.budget_cap, n + 1, self.cap_rule)
        logits[:, vocab] = torch.where(over, torch.full_like(logits[:, vocab], -math.inf), logits[:, vocab])

    def choose(
        self, logits: torch.Tensor, teacher: _CatchUpTeacher, out: _Outputs, n: int, margins: _DecisionMargins
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(call ``[B]``, token ``[B]``) at step ``n``: the teacher's argmax where a row calls."""
        vocab = logits.shape[1] - 1
        if self.kl_oracle_threshold is not None:  # the reference: the teacher at every step, KL decides
            teacher_logits = teacher.next_logits(out.tokens[:, :n]).to(logits.device)
            kl = teacher_student_kl(teacher_logits[:, None], logits[:, None])[:, 0]
            call = (kl > self.kl_oracle_threshold) & (logits[:, vocab] > -math.inf) & ~out.done
            margins.undefined = True
            return call, torch.where(call, teacher_logits.argmax(dim=-1), logits[:, :vocab].argmax(dim=-1))
        # Greedy: call iff π(<τ>) > call_threshold, else the top token (a capped row's <τ> logit is −inf).
        call_logprob = call_log_probability(logits)
        action = choose_actions(logits, call_threshold=self.call_threshold, call_logprob=call_logprob)
        call = (action == vocab) & ~out.done
        margins.record(call_logprob, call, ~out.done)
        return call, teacher.replace(action, call, out.tokens[:, :n])


class _DecisionMargins:
    """The range of log call thresholds that would repeat every greedy call decision seen so far
    (:attr:`DecodeResult.same_decisions`), kept as tensors so that recording never syncs."""

    def __init__(self, device: torch.device) -> None:
        self.highest_declined = torch.tensor(-math.inf, device=device)
        self.lowest_called = torch.tensor(math.inf, device=device)
        self.undefined = False  # the KL oracle decides by KL, not by a threshold on π(<τ>)

    def record(self, call_logprob: torch.Tensor, call: torch.Tensor, live: torch.Tensor) -> None:
        declined = live & ~call
        self.highest_declined = torch.maximum(self.highest_declined, call_logprob.masked_fill(~declined, -math.inf).max())
        self.lowest_called = torch.minimum(self.lowest_called, call_logprob.masked_fill(~call, math.inf).min())

    def result(self) -> tuple[float, float] | None:
        return None if self.undefined else (float(self.highest_declined), float(self.lowest_called))


def _teacher_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, teacher_input_ids: torch.Tensor | None,
    teacher_attention_mask: torch.Tensor | None, max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's prompts C^(T): its own when given (both, one row per prompt), else the student's."""
    if teacher_input_ids is None and teacher_attention_mask is None:
        return input_ids, attention_mask
    if teacher_input_ids is None or teacher_attention_mask is None:
        raise ValueError("pass both teacher_input_ids and teacher_attention_mask, or neither")
    _check_inputs(teacher_input_ids, teacher_attention_mask, max_new_tokens)
    if teacher_input_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"teacher prompts have {teacher_input_ids.shape[0]} rows, expected {input_ids.shape[0]} (one per prompt)"
        )
    return teacher_input_ids, teacher_attention_mask


@torch.no_grad()
def teacher_help_decode(
    policy: StudentPolicy,
    teacher: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    budget_cap: float | None = None,
    teacher_input_ids: torch.Tensor | None = None,
    teacher_attention_mask: torch.Tensor | None = None,
    *,
    cap_rule: str = "rounded_up",
    call_threshold: float | None = None,
    kl_oracle_threshold: float | None = None,
    budget: float | None = None,
) -> DecodeResult:
    """Training Wheels at test time: the student decodes greedily over V+1 actions and calls the teacher.

    Args:
        policy: the trained :class:`~agents.policy.StudentPolicy` (action V = <τ>).
        teacher: the teacher LM (the policy's family, the same output vocabulary).
        input_ids, attention_mask: ``[B, L]`` prompts (including the budget keyword), right-padded.
        max_new_tokens: the most output tokens per row.
        budget_cap: optional hard cap b ∈ [0, 1]: at the step that would produce output token n
            (1-based) <τ> is allowed only if calls_so_far + 1 ≤ A(b, n), the allowance of ``cap_rule``;
            otherwise the best token of V is taken. So every prefix, and hence the whole output, has
            at most A(b, length) calls. ``None``: no cap.
        teacher_input_ids, teacher_attention_mask: the teacher's own prompts C^(T) (e.g. without the
            budget keyword; see the env's ``teacher_prompt``); by default the teacher reads ``input_ids``.
        cap_rule: the allowance (:func:`~agents.objectives.budget_allowance`; checked even without a
            cap): ``"rounded_up"`` (the default), A = ⌈b·n⌉, a cap on the rate under which an output
            of n tokens may exceed b by less than one call; ``"guaranteed"``, A = ⌊b·n⌋, under which
            every output's teacher fraction is ≤ b (and no call comes before b·n reaches 1).
        call_threshold: call iff π(<τ>) > this. ``None`` (the default): the checkpoint's own rule at
            ``budget``, :meth:`~agents.policy.StudentPolicy.call_threshold_for`: the threshold ``tw
            train`` calibrated for that budget on its selection rows (``call_rule.json``), else ½,
            the raw decision π(<τ>) > ½. A threshold calibrated per budget makes teacher use land
            at the budget when the learnt call rate misses it.
        kl_oracle_threshold: a reference, not a decoder one can deploy: ignore <τ> and call wherever
            KL(p ‖ π_V) at the current prefix exceeds this (the Phase-1 oracle's ranking, §2.4.1,
            applied online; the teacher runs at every step). ``None``: the policy decides.
        budget: the budget the prompts ask for, which picks the checkpoint's threshold when
            ``call_threshold`` is None (``None``: ½). The prompts themselves carry the budget to the
            policy; this only chooses the threshold.

    One student forward per token for all rows; the student reads X^(in) (a teacher token t as t+V,
    Eq. 15). When any row emits <τ>, the teacher catches up on X^(out) in one forward and the calling
    rows take its argmax. ``wasted_tokens`` is 0 for every row.
    """
    _check_inputs(input_ids, attention_mask, max_new_tokens)
    if call_threshold is None:
        call_threshold = policy.call_threshold_for(budget)
    rule = _CallRule(budget_cap, cap_rule, call_threshold, kl_oracle_threshold)
    model, vocab = policy.model, policy.vocab_size
    check_same_family(teacher, model)
    check_same_vocabulary(teacher, vocab)
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    teacher_ids, teacher_mask = _teacher_prompts(
        input_ids, attention_mask, teacher_input_ids, teacher_attention_mask, max_new_tokens
    )
    batch_size = input_ids.shape[0]
    out = _Outputs(batch_size, max_new_tokens, _pad_id(model), _eos_ids(model, device))
    with _eval_mode(policy, teacher):
        student = family_of(model).incremental_decoder(model, batch_size, max_new_tokens + 1)
        rows = torch.arange(batch_size, device=device)
        prompt, x_in = policy.begin(student, rows, input_ids, attention_mask)  # the prompt read once, not per step
        helper = _CatchUpTeacher(teacher, teacher_ids.to(teacher.device), teacher_mask.to(teacher.device), max_new_tokens)
        forwards = 0
        margins = _DecisionMargins(device)
        for n in range(max_new_tokens):
            if bool(out.done.all()):
                break
            logits = policy.step_head(student, x_in, prompt).float()  # [B, V+1]
            forwards += 1
            rule.apply_cap(logits, out, n)
            call, token = rule.choose(logits, helper, out, n, margins)
            token = out.emit(token, call)
            x_in = torch.where(call, token + vocab, token)  # X^(in): a teacher token is stored as t + V
    return dataclasses.replace(out.result(helper.forwards, forwards), same_decisions=margins.result())


# --------------------------------------------------------------------------------------------- alone


@torch.no_grad()
def generate_alone(
    model: PreTrainedModel | StudentPolicy,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    is_teacher: bool = False,
) -> DecodeResult:
    """The student alone or the teacher alone: transformers ``generate`` (greedy, one beam).

    With ``is_teacher`` every token is marked as from the teacher and counted in ``teacher_calls``
    and ``teacher_forwards``; otherwise the forwards count as ``student_forwards``. A StudentPolicy is
    decoded over V only (its underlying LM; <τ> is not an action here). The right-padded prompts go
    to ``generate`` as the family wants them (:meth:`~tw_env.families.ModelFamily.generation_inputs`:
    a causal LM's left-padded, so that each row continues its own last token).
    """
    _check_inputs(input_ids, attention_mask, max_new_tokens)
    model = _as_model(model)
    family = family_of(model)
    device = model.device
    eos = set(_eos_ids(model, device).tolist())
    if max_new_tokens == 0:
        rows: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        return DecodeResult(rows, [[] for _ in rows], [0] * len(rows), 0, [0] * len(rows))
    generate_ids, generate_mask = family.generation_inputs(input_ids.to(device), attention_mask.to(device))
    with _eval_mode(model):
        generated = generation_model(model).generate(
            input_ids=generate_ids,
            attention_mask=generate_mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
        )
    out: list[list[int]] = []
    for row in family.generated_tokens(generated, generate_ids.shape[1]).tolist():  # no start token, no prompt
        # Cut at the first EOS only: the pad id may be an ordinary output token (T5: pad = start = 0).
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:end])
    steps = max((len(r) for r in out), default=0)
    return DecodeResult(
        output_ids=out,
        from_teacher=[[is_teacher] * len(r) for r in out],
        teacher_calls=[len(r) if is_teacher else 0 for r in out],
        teacher_forwards=steps if is_teacher else 0,
        wasted_tokens=[0] * len(out),
        student_forwards=0 if is_teacher else steps,
    )


# --------------------------------------------------------------------------------------------- speculative


class _Speculation:
    """The state of lossy speculative decoding between cycles: both KV caches, the tokens each model
    must read next, the outputs, the wasted drafts per row and the forwards run."""

    def __init__(
        self, drafter: PreTrainedModel, teacher: PreTrainedModel, input_ids: torch.Tensor,
        attention_mask: torch.Tensor, out: _Outputs, draft_length: int,
    ) -> None:
        batch_size, device, pad = input_ids.shape[0], input_ids.device, out.pad_id
        self.out, self.draft_length = out, draft_length
        self.wasted = torch.zeros(batch_size, dtype=torch.long, device=device)
        rows = torch.arange(batch_size, device=device)
        # A row's live content never exceeds start + max_new_tokens + 1 tokens; the margin keeps the
        # compaction (which only drops columns masked for every row) from running every cycle.
        max_len = out.max_new_tokens + 2 * draft_length + 4
        family = family_of(drafter)
        self.draft = family.incremental_decoder(drafter, batch_size, max_len)
        self.verify = family.incremental_decoder(teacher, batch_size, max_len)
        draft_context, draft_mask, draft_first = family.restart_batch(drafter, input_ids, attention_mask)
        teacher_context, teacher_mask, teacher_first = family.restart_batch(
            teacher, input_ids.to(teacher.device), attention_mask.to(teacher.device)
        )
        self.draft.restart(rows, draft_context, draft_mask)
        self.verify.restart(rows.to(teacher.device), teacher_context, teacher_mask)
        # Tokens each model must read before it can predict the next one. The teacher always has one
        # (its first token: the start token or the prompt's last, then the last replacement/bonus
        # token). The draft model has two after a full acceptance: its own last draft (never fed, it
        # was the K-th) and the bonus token.
        self.draft_pending = torch.full((batch_size, 2), pad, dtype=torch.long, device=device)
        self.draft_pending[:, 0] = draft_first
        self.two_pending = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.teacher_pending = teacher_first.to(device)
        self.teacher_forwards = self.student_forwards = 0

    def cycle(self, lenience: float) -> None:
        """Draft k tokens per row, verify them in one teacher forward, append the accepted block, roll back."""
        out = self.out
        live = ~out.done
        remaining = out.max_new_tokens - out.lengths
        # Drafts beyond what any live row may still output would all be truncated.
        k = min(self.draft_length, int(remaining[live].max()))
        drafts = self._draft(live, k)
        # ---- verify: one teacher forward over [pending, x_1 … x_k]
        t_inputs = torch.cat([self.teacher_pending[:, None], drafts.to(self.teacher_pending.device)], dim=1)
        t_logp = F.log_softmax(self.verify.logits(self.verify.step(input_ids=t_inputs)).float(), dim=-1)
        t_logp = t_logp.to(drafts.device)
        self.teacher_forwards += 1
        best_logp, best = t_logp.max(dim=-1)  # [B, k+1]: x̂_j and log p(x̂_j)
        draft_logp = t_logp[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # [B, k]: log p(x_j)
        # n_b in [0, k]: Algorithm 1, line 6
        accepted = lossy_speculative_accept_length(draft_logp, best_logp[:, :k], lenience)
        self._append(drafts, best, accepted, live, remaining)
        self._roll_back(drafts, best, accepted)

    def _draft(self, live: torch.Tensor, k: int) -> torch.Tensor:
        """``[B, k]`` greedy drafts; the first step also reads any second pending token."""
        draft, pad = self.draft, self.out.pad_id
        two = self.two_pending & live
        if bool(two.any()):
            states = draft.step(input_ids=torch.where(live[:, None], self.draft_pending, pad))  # [B, 2, d]
            draft.rollback((~two).long())  # rows with one pending token forget the padding slot
            state = torch.where(two[:, None], states[:, 1], states[:, 0])
        else:
            state = draft.step(input_ids=torch.where(live, self.draft_pending[:, 0], pad))
        draft_steps = [draft.logits(state).argmax(dim=-1)]
        for _ in range(k - 1):
            draft_steps.append(draft.logits(draft.step(input_ids=draft_steps[-1])).argmax(dim=-1))
        self.student_forwards += k
        return torch.stack(draft_steps, dim=1)

    def _append(
        self, drafts: torch.Tensor, best: torch.Tensor, accepted: torch.Tensor, live: torch.Tensor,
        remaining: torch.Tensor,
    ) -> None:
        """New tokens: x_1 … x_n, then x̂_n (replacement or bonus), cut at EOS and ``max_new_tokens``."""
        out, k = self.out, drafts.shape[1]
        column = torch.arange(k + 1, device=drafts.device)[None, :]
        padded_drafts = F.pad(drafts, (0, 1), value=out.pad_id)
        block = torch.where(column < accepted[:, None], padded_drafts, best)  # valid up to column n
        count = torch.minimum(accepted + 1, remaining)
        is_eos = torch.isin(block, out.eos) & (column < count[:, None])
        first_eos = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1) + 1, count)
        count = torch.minimum(count, first_eos)
        count = torch.where(live, count, torch.zeros_like(count))
        # A rejection wastes the drafts from x_{n+1} on, if the row got as far as the replacement
        # token. Only the drafts a row could use count (min(k, remaining)): the batch drafts k for
        # its longest live row, and what a row wastes must not depend on the rows beside it.
        rejected = (accepted < k) & (count == accepted + 1)
        usable = torch.clamp(remaining, max=k)
        self.wasted += torch.where(rejected, usable - accepted, torch.zeros_like(accepted))
        out.append_block(block, count, column == accepted[:, None])

    def _roll_back(self, drafts: torch.Tensor, best: torch.Tensor, accepted: torch.Tensor) -> None:
        """Both caches back to each row's accepted prefix.

        The teacher read [pending, x_1 … x_k] and keeps [pending, x_1 … x_n]. The draft model read its
        pending token(s) and x_1 … x_{k-1}; it keeps them up to x_n (n < k), or all of them, x_k then
        still to be read (n = k). Finished rows forget the whole cycle, so their start advances and
        the cache can be compacted.
        """
        k, finished, pad = drafts.shape[1], self.out.done, self.out.pad_id
        self.verify.rollback(torch.where(finished, k + 1, k - accepted).to(self.verify.device))
        self.draft.rollback(torch.where(finished, k, (k - 1 - accepted).clamp(min=0)))
        full = accepted == k
        bonus_or_fix = best.gather(1, accepted[:, None]).squeeze(1)
        self.draft_pending = torch.stack(
            [torch.where(full, drafts[:, -1], bonus_or_fix), torch.where(full, bonus_or_fix, pad)], dim=1
        )
        self.two_pending = full
        self.teacher_pending = bonus_or_fix.to(self.teacher_pending.device)


@torch.no_grad()
def speculative_decode(
    draft_model: PreTrainedModel | StudentPolicy,
    teacher: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    lenience: float,
    draft_length: int,
) -> DecodeResult:
    """Lossy greedy speculative decoding (Appendix 5.3, Algorithm 1), batched.

    Each cycle the draft model proposes K = ``draft_length`` greedy tokens per row (K incremental
    steps), the teacher scores them in one forward over K+1 positions, and row b accepts the first
    n_b drafts, n_b = min{j : p(x_j) < l·p(x̂_j)} ∪ {K}. The token after them is the teacher's argmax
    x̂_{n_b}: a replacement of the first rejected draft (n_b < K) or a free bonus token (n_b = K).
    Both KV caches are then rolled back per row to the accepted prefix. Lenience 1 gives the
    teacher's greedy output; lenience 0 accepts every draft.

    Returns a :class:`DecodeResult` where replacement and bonus tokens are teacher tokens and
    ``wasted_tokens[b]`` counts the drafts of row b the teacher rejected: per rejection, the drafts
    from the rejected one on, up to the row's own remaining length (a batch drafts for its longest
    live row; the count is what the row would waste alone). Drafts cut off by EOS or by
    ``max_new_tokens`` were not rejected and are not counted. ``teacher_forwards`` is the number of
    cycles, ``student_forwards`` the draft steps. A row's accepted block is truncated at EOS and at
    ``max_new_tokens``; the last cycle drafts no more tokens than the longest live row may still use.
    """
    _check_inputs(input_ids, attention_mask, max_new_tokens)
    if draft_length < 1:
        raise ValueError(f"draft_length must be >= 1, got {draft_length}")
    if not 0.0 <= lenience <= 1.0:
        raise ValueError(f"lenience must lie in [0, 1], got {lenience}")
    drafter, input_ids, attention_mask, out = _start_pair(draft_model, teacher, input_ids, attention_mask,
                                                          max_new_tokens, "draft model")
    with _eval_mode(drafter, teacher):
        speculation = _Speculation(drafter, teacher, input_ids, attention_mask, out, draft_length)
        while not bool(out.done.all()):
            speculation.cycle(lenience)
    return out.result(speculation.teacher_forwards, speculation.student_forwards, speculation.wasted)


# --------------------------------------------------------------------------------------------- fallback


@torch.no_grad()
def confidence_fallback_decode(
    student_model: PreTrainedModel | StudentPolicy,
    teacher: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    threshold: float,
) -> DecodeResult:
    """Big Little Decoder's fallback policy: the student decodes greedily and hands a token to the
    teacher whenever its top probability is below ``threshold``.

    The teacher is the same lazy catch-up teacher as in :func:`teacher_help_decode`. The student
    needs no rollback: at each step it has only computed the distribution, so it next reads
    whichever token was emitted (its own argmax or the teacher's). ``threshold`` 0 never falls back;
    a threshold above 1 always does.
    """
    _check_inputs(input_ids, attention_mask, max_new_tokens)
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    model, input_ids, attention_mask, out = _start_pair(student_model, teacher, input_ids, attention_mask, max_new_tokens)
    batch_size, device = input_ids.shape[0], model.device
    with _eval_mode(model, teacher):
        student = family_of(model).incremental_decoder(model, batch_size, max_new_tokens + 1)
        context, context_mask, token = family_of(model).restart_batch(model, input_ids, attention_mask)
        student.restart(torch.arange(batch_size), context, context_mask)
        helper = _CatchUpTeacher(
            teacher, input_ids.to(teacher.device), attention_mask.to(teacher.device), max_new_tokens
        )
        forwards = 0
        for n in range(max_new_tokens):
            if bool(out.done.all()):
                break
            logp = F.log_softmax(student.logits(student.step(input_ids=token)).float(), dim=-1)  # [B, V]
            forwards += 1
            if threshold > 1.0:  # max π ≤ 1 < threshold: always (the shared rule is defined on [0, 1])
                fallback = torch.ones(batch_size, dtype=torch.bool, device=device)
            else:
                fallback = confidence_fallback(logp, threshold)
            fallback = fallback & ~out.done
            token = out.emit(helper.replace(logp.argmax(dim=-1), fallback, out.tokens[:, :n]), fallback)
    return out.result(helper.forwards, forwards)
