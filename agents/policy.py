"""The student policy π over V ∪ {<τ>}, and the value network, both around a transformers LM of either
model family: an encoder-decoder (T5) or a causal, decoder-only LM (``AutoModelForCausalLM``).

- One extra output logit for <τ>: a linear read of the LM's final state (next to the LM head),
  of the student's confidence in its own next token, and of the prompt (see :class:`StudentPolicy`).
- :func:`choose_actions`: how the policy acts, deciding the call first and then the token.
- X^(in) is embedded as in Eq. 15: a student token x as Embed(x), a teacher token t (stored as t + V)
  as Embed(t) + β, with β a learnable vector.
- Full teacher-forced forwards for training; :class:`PolicyRollout` for incremental decoding with a
  KV cache while acting in the (vector) environment.
- Saved with safetensors: the underlying LM through ``save_pretrained`` (loadable by plain
  transformers) and the Training Wheels parameters (β, the <τ> head) beside it, with the family.

What depends on the family is how the LM reads the prompt Y and then X^(in): methods of the model
family (:meth:`~tw_env.model_family.ModelFamily.read_prompt`, ``read_stream``, ``restart_rows``, and
``lm_head_logits`` for the head); the rest (Eq. 15, the prompt summary, the heads, the rollout) is
written once:

=================  ==========================================  ===============================================
                   encoder-decoder (T5)                        decoder-only (causal LM)
=================  ==========================================  ===============================================
Y is read by       the encoder, once                           a prefill of Y minus its last token into the
                                                               KV cache, once (as the env's causal teacher)
X^(in) stream      [decoder start ; x_1 … x_T] in the decoder  [last token of Y ; x_1 … x_T] after the cache,
                                                               at positions |Y|−1, |Y|, … of each row
prompt states      the encoder states of Y                     the final states of Y minus its last token
teacher-forced     encoder, then one decoder pass              prefill, then one k-token step of the same
                                                               incremental decoder the rollout steps
=================  ==========================================  ===============================================
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tw_env.atomic import write_json
from tw_env.families import FAMILIES, IncrementalDecoding, ModelFamily, PromptPass, family_of
from tw_env.models import load_model, output_vocab_size
from tw_env.prompts import NUMERIC_BUDGET_TEMPLATE, numeric_budget_in

EXTRA_WEIGHTS = "training_wheels.safetensors"
EXTRA_CONFIG = "training_wheels.json"
BUDGET_TOKENIZER = "budget_tokenizer"  # read_budget_value: the tokenizer that turns prompt ids back into text
# The knots of the budget basis (read_budget_value): hat functions 0.1 apart over [0, 1].
BUDGET_BASIS_KNOTS = tuple(k / 10 for k in range(11))
LM_BUDGET_HINTS = ("none", "tenths")  # hide_budget: what of the budget's number the LM still reads
CALL_RULE = "call_rule.json"  # the calibrated call thresholds per budget (tw train), beside the weights


@dataclass
class PromptFeatures:
    """What the policy reads from the prompt, computed once per episode (not at every step).

    ``summary`` ``[B, d]`` is added to every decoder input; ``call_bias`` ``[B, 1]`` to the <τ> logit.
    """

    summary: torch.Tensor
    call_bias: torch.Tensor

    def assign(self, rows: torch.Tensor, other: PromptFeatures) -> None:
        """Overwrite ``rows`` with ``other``'s features (rows whose episodes restarted)."""
        self.summary[rows] = other.summary.to(self.summary.dtype)
        self.call_bias[rows] = other.call_bias.to(self.call_bias.dtype)


def decoder_inputs(state_ids: torch.Tensor, start_token_id: int) -> torch.Tensor:
    """Shift X^(in) right: position i reads the token emitted at i−1 (the start token at 0).

    Returns ``[B, T+1]`` so that position T gives the state after the last action (for values).
    """
    start = torch.full_like(state_ids[:, :1], start_token_id)
    return torch.cat([start, state_ids], dim=1)


class _StateEmbedding(nn.Module):
    """Eq. 15: Embed(x) for student tokens, Embed(t) + β for teacher tokens (ids ≥ V)."""

    def __init__(self, model: PreTrainedModel, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.beta = nn.Parameter(torch.zeros(model.config.hidden_size))

    def forward(self, embed: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        from_teacher = ids >= self.vocab_size
        vectors = embed(torch.where(from_teacher, ids - self.vocab_size, ids))
        return vectors + from_teacher.unsqueeze(-1).to(vectors.dtype) * self.beta.to(vectors.dtype)


# ------------------------------------------------------------------------------------ policy and value


class _StateModel(nn.Module):
    """Shared plumbing: an LM that reads (Y, X^(in)) with the Eq. 15 embedding, for either family.

    Besides Eq. 15, every input of the X^(in) stream also receives a *prompt summary*: a learnt
    projection of the mean prompt state (the encoder states of T5, the prefill's final states of a causal
    LM: :meth:`~tw_env.model_family.ModelFamily.restart_rows`), zero at initialisation (so the pretrained LM is unchanged at first).
    Why: the budget lives in the prompt, and a small student's cross-attention is busy aligning
    source words; on the embedded task a 60k-parameter student could not tell "no", "light",
    "moderate-light" and "moderate" apart through cross-attention alone after phase 1 (its
    π(<τ>) was identical for the four), while the summary gives every step a direct view of them.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        family_of(model)  # refuses a model of neither family now, with the model type in the message
        self.vocab_size = output_vocab_size(model)
        self.state_embedding = _StateEmbedding(model, self.vocab_size)
        hidden = model.config.hidden_size
        self.prompt_summary = nn.Linear(hidden, hidden, bias=False)
        nn.init.zeros_(self.prompt_summary.weight)
        # None: the prompt is read as the mean of its states. A vector: read by attention with this query
        # (:meth:`read_prompt_by_attention`).
        self.prompt_query: nn.Parameter | None
        self.register_parameter("prompt_query", None)

    def read_prompt_by_attention(self, query: torch.Tensor | None = None) -> None:
        """Read the prompt by attention pooling with a learnt query (zeros at first, or ``query``'s values)
        instead of the mean.

        Why: the prompt reads (the stream-input summary and the <τ> logit's prompt part) see the
        budget through the pooled prompt states. The mean of ~25 states dilutes the few that state a
        numeric budget ("0.15"); attention can weight them. A zero query attends uniformly, i.e. reads
        the mean, so switching a trained policy over starts from what it computed before.
        """
        if self.prompt_query is None:
            hidden = self.model.config.hidden_size
            self.prompt_query = nn.Parameter(torch.zeros(hidden, device=self.prompt_summary.weight.device,
                                                         dtype=self.prompt_summary.weight.dtype))
        if query is not None:
            with torch.no_grad():
                self.prompt_query.copy_(query)

    @property
    def family(self) -> ModelFamily:
        """The LM's model family (read from its config)."""
        return family_of(self.model)

    @property
    def start_token_id(self) -> int:
        """The decoder start token (encoder-decoder policies only; a causal stream starts with the prompt's last token)."""
        return self.family.start_token_id(self.model)

    @staticmethod
    def prompt_mean(encoder_states: torch.Tensor, encoder_mask: torch.Tensor) -> torch.Tensor:
        """``[B, d]``: the mean of the prompt states over the prompt's tokens."""
        weights = encoder_mask.to(encoder_states.dtype).unsqueeze(-1)
        return (encoder_states * weights).sum(1) / weights.sum(1).clamp(min=1)

    def prompt_pool(self, encoder_states: torch.Tensor, encoder_mask: torch.Tensor) -> torch.Tensor:
        """``[B, d]``: the prompt states pooled over the prompt's tokens: their mean, or with a
        :attr:`prompt_query`, their attention-weighted sum (softmax of q·h / √d over the tokens)."""
        if self.prompt_query is None:
            return self.prompt_mean(encoder_states, encoder_mask)
        query = self.prompt_query.to(encoder_states.dtype)
        scores = (encoder_states @ query) / math.sqrt(encoder_states.shape[-1])
        weights = torch.softmax(scores.float().masked_fill(encoder_mask == 0, -1e9), dim=1).to(encoder_states.dtype)
        return (encoder_states * weights.unsqueeze(-1)).sum(1)

    def prompt_vector(self, encoder_states: torch.Tensor, encoder_mask: torch.Tensor) -> torch.Tensor:
        """``[B, d]``: the projected pooled prompt states (:meth:`prompt_pool`)."""
        pooled = self.prompt_pool(encoder_states, encoder_mask)
        return self.prompt_summary(pooled.to(self.prompt_summary.weight.dtype)).to(encoder_states.dtype)

    def encode(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """The encoder states of the prompts (a family whose models have an encoder; others raise TypeError)."""
        return self.family.encode(self.model, prompt_ids, prompt_mask)

    def read_prompt(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, steps: int, encoded: torch.Tensor | None = None
    ) -> PromptPass:
        """The prompt part of a teacher-forced pass over ``steps`` stream tokens, as the family reads it."""
        return self.family.read_prompt(self.model, prompt_ids, prompt_mask, steps, encoded)

    def stream_states(
        self, prompt: PromptPass, summary: torch.Tensor, state_ids: torch.Tensor, state_mask: torch.Tensor
    ) -> torch.Tensor:
        """Final states ``[B, T+1, d]`` of the stream ``[first ; X^(in)]`` after the prompt pass."""
        inputs = torch.cat([prompt.first[:, None].to(state_ids.dtype), state_ids], dim=1)
        embeds = self.state_embedding(self.model.get_input_embeddings(), inputs)
        embeds = embeds + summary[:, None].to(embeds.dtype)
        return self.family.read_stream(self.model, prompt, embeds, state_mask)

    def decoder_states(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, state_ids: torch.Tensor, state_mask: torch.Tensor,
        encoded: torch.Tensor | None = None, summary: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final states ``[B, T+1, d]`` for every state s_0..s_T of the episodes (one teacher-forced pass).

        ``encoded`` (an encoder-decoder's encoder output for the prompts) and ``summary``
        (:meth:`prompt_vector` of the prompt states) are computed when not given.
        """
        prompt = self.read_prompt(prompt_ids, prompt_mask, state_ids.shape[1] + 1, encoded)
        if summary is None:
            summary = self.prompt_vector(prompt.states, prompt.mask)
        return self.stream_states(prompt, summary, state_ids, state_mask)

    def prompt_features(self, encoder_states: torch.Tensor, encoder_mask: torch.Tensor,
                        prompt_ids: torch.Tensor | None = None) -> PromptFeatures:
        """The per-episode prompt reads from the prompt states: the stream-input summary (and no <τ>
        bias: only :class:`StudentPolicy` has a <τ> logit). ``prompt_ids``: the prompts' ids, which only a
        policy that reads the budget's value needs (:meth:`StudentPolicy.read_budget_value`)."""
        summary = self.prompt_vector(encoder_states, encoder_mask)
        return PromptFeatures(summary, summary.new_zeros(summary.shape[0], 1))

    def begin(
        self, decoder: IncrementalDecoding, rows: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[PromptFeatures, torch.Tensor]:
        """Begin episodes in ``rows`` of ``decoder`` (an incremental decoder of this model's LM) with
        right-padded prompts: their :class:`PromptFeatures` and the token each row's first step reads."""
        states, mask, first = self.family.restart_rows(self.model, decoder, rows, prompt_ids, prompt_mask)
        return self.prompt_features(states, mask, prompt_ids), first

    def step_states(self, decoder: IncrementalDecoding, ids: torch.Tensor, prompt: PromptFeatures) -> torch.Tensor:
        """Final states of one incremental step that feeds X^(in) tokens ``ids`` ``[B]`` to ``decoder``: ``[B, d]``.

        ``ids`` ``[B, k]`` feed k stream tokens per row in one forward (a teacher-forced catch-up): ``[B, k, d]``.
        ``prompt`` is what :meth:`begin` returned (computed once per episode).
        """
        embeds = self.state_embedding(self.model.get_input_embeddings(), ids)
        summary = prompt.summary if ids.dim() == 1 else prompt.summary[:, None]
        return decoder.step(inputs_embeds=embeds + summary.to(embeds.dtype))

    @property
    def device(self) -> torch.device:
        return self.model.device


def budget_basis(budgets: torch.Tensor) -> torch.Tensor:
    """``[B, K]``: the piecewise-linear (hat) basis of budgets ``[B]`` on :data:`BUDGET_BASIS_KNOTS`:
    feature k is max(0, 1 − |b − knot_k| / 0.1), so a budget between two knots is their linear blend
    (0.15 → ½ at 0.1 and ½ at 0.2) and a linear read of it is piecewise linear in b."""
    knots = torch.tensor(BUDGET_BASIS_KNOTS, dtype=torch.float64)
    spacing = knots[1] - knots[0]
    return (1 - (budgets.to(torch.float64)[:, None] - knots[None]).abs() / spacing).clamp(min=0)


def _log_odds(probability: float) -> float:
    return math.log(probability) - math.log1p(-probability)


class StudentPolicy(_StateModel):
    """π(· | X^(in)_<i, Y) over V + 1 actions; action V is <τ>.

    The <τ> logit is a sum of three linear reads, all zero at initialisation:

    - of the LM's final state (the paper's extra output logit);
    - of the student's confidence in its own next token (max log-probability and entropy of its
      distribution over V). Why: whether to ask is mostly "how unsure am I", a non-linear function
      of the state that a linear head on a small decoder approximates poorly;
    - of the mean prompt state. Why: the budget keyword shifts the threshold of that
      decision, and this gives it a direct path from the prompt to the <τ> logit.

    ``StudentPolicy(model)`` takes a T5-style seq2seq LM or a causal LM; the family is read from its config.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model)
        d_model = model.config.hidden_size
        self.call_head = nn.Linear(d_model, 1)
        self.call_confidence = nn.Linear(2, 1, bias=False)
        self.call_prompt = nn.Linear(d_model, 1, bias=False)
        # Start with <τ> as likely as an average token would be under a flat head; phase 1 teaches it.
        for layer in (self.call_head, self.call_confidence, self.call_prompt):
            nn.init.zeros_(layer.weight)
        nn.init.zeros_(self.call_head.bias)
        # The checkpoint's call rule: per budget, the threshold c of "call iff π(<τ>) > c" that `tw train`
        # calibrated on its selection rows (empty: the raw rule c = ½ at every budget).
        self.call_thresholds: dict[float, float] = {}
        # read_budget_value: the tokenizer that turns prompt ids back into text, and the read of b's basis.
        self.budget_tokenizer: PreTrainedTokenizerBase | None = None
        self.call_budget: nn.Linear | None = None
        # hide_budget_from_lm: the LM reads the prompt with the budget's number replaced by one placeholder
        # token (the value still reaches the <τ> logit through the basis); per-vocabulary lookups of which
        # pieces write a number.
        self.hide_budget_from_lm = False
        self.lm_budget_hint = "none"  # with hide_budget_from_lm: what of the number the LM still reads (LM_BUDGET_HINTS)
        self._number_pieces: torch.Tensor | None = None  # [V] bool: the piece is digits, "." or a bare word start
        self._digit_pieces: torch.Tensor | None = None  # [V] bool: the piece holds a digit
        self._number_tails: torch.Tensor | None = None  # [V] bool: the piece starts with a digit or "."
        self._tenths_hints: list[list[int]] | None = None  # lm_budget_hint "tenths": the pieces of "0.0" … "1.0"

    def call_threshold_for(self, budget: float | None) -> float:
        """The checkpoint's call threshold at ``budget``: the calibrated one where ``tw train`` learnt it;
        between two calibrated budgets (a numeric-prompt policy asked for a budget it was not calibrated
        at), interpolated linearly in log-odds between theirs, as the dual's λ(b) is between its knots;
        else ½ (the policy's own decision: no budget named, no rule, or a budget outside the calibrated ones)."""
        if budget is None:
            return 0.5
        for b, c in self.call_thresholds.items():
            if math.isclose(b, budget, abs_tol=1e-9):
                return c
        below = [b for b in self.call_thresholds if b < budget]
        above = [b for b in self.call_thresholds if b > budget]
        if not below or not above:
            return 0.5
        lo, hi = max(below), min(above)
        weight = (budget - lo) / (hi - lo)
        log_odds = (1 - weight) * _log_odds(self.call_thresholds[lo]) + weight * _log_odds(self.call_thresholds[hi])
        return 1.0 / (1.0 + math.exp(-log_odds))

    @property
    def teacher_action(self) -> int:
        return self.vocab_size

    def prompt_features(self, encoder_states: torch.Tensor, encoder_mask: torch.Tensor,
                        prompt_ids: torch.Tensor | None = None) -> PromptFeatures:
        """The per-episode prompt reads from the prompt states (T5: the encoder's; causal: the prefill's):
        the stream-input summary and the <τ> logit's prompt part (with :meth:`read_budget_value`, plus
        the read of the budget's value, which needs ``prompt_ids``)."""
        pooled = self.prompt_pool(encoder_states, encoder_mask)
        summary = self.prompt_summary(pooled.to(self.prompt_summary.weight.dtype)).to(encoder_states.dtype)
        call_bias = self.call_prompt(pooled.to(self.call_prompt.weight.dtype))
        if self.budget_tokenizer is not None and self.call_budget is not None:
            if prompt_ids is None:
                raise ValueError("this policy reads the budget's value from its prompts (read_budget_value): "
                                 "expected the prompt ids beside the prompt states, got none")
            features = budget_basis(self.budget_values(prompt_ids)).to(call_bias.device, self.call_budget.weight.dtype)
            call_bias = call_bias + self.call_budget(features)
        return PromptFeatures(summary, call_bias)

    def read_budget_value(self, tokenizer: PreTrainedTokenizerBase, weights: torch.Tensor | None = None) -> None:
        """Let the <τ> logit read the budget's *value* b from the prompt ("With teacher use 0.150, ..."):
        a linear read of a piecewise-linear basis of b (:func:`budget_basis`), zero at first (or ``weights``).

        Why: the prompt reads see the budget only as tokens, and a small student learns the strings it was
        trained on one by one, not the number they write (de→en: 0.149, 0.150 and 0.151 called at 0.31, 0.03
        and 0.04; docs/any-budget.md). Through the basis an unseen b is read between its neighbours by
        construction. ``tokenizer``: the task's, to turn prompt ids back into text (saved with the policy).
        """
        self.budget_tokenizer = tokenizer
        if self.call_budget is None:
            self.call_budget = nn.Linear(len(BUDGET_BASIS_KNOTS), 1, bias=False).to(
                device=self.call_prompt.weight.device, dtype=self.call_prompt.weight.dtype)
            nn.init.zeros_(self.call_budget.weight)
        if weights is not None:
            with torch.no_grad():
                self.call_budget.weight.copy_(weights)

    def budget_values(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``[B]`` float64: the budget each prompt states, parsed from its text (:meth:`read_budget_value`)."""
        assert self.budget_tokenizer is not None
        texts = self.budget_tokenizer.batch_decode(prompt_ids.tolist(), skip_special_tokens=True)
        values = [numeric_budget_in(text) for text in texts]
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            raise ValueError(f"prompt {missing[0]} of the batch states no numeric budget ('With teacher use 0.150, ...'), "
                             f"which this policy reads: got {texts[missing[0]][:80]!r}")
        return torch.tensor(values, dtype=torch.float64)

    def hide_budget(self, hint: str = "none") -> None:
        """Let the LM read every prompt with its budget's number replaced by one placeholder token (the
        tokenizer's unknown token), so that the LM sees the same prompt at every budget and the budget
        reaches π only through the value read (:meth:`read_budget_value`, which this needs).

        Why: a small student learns the number strings it was trained on one by one, and an unseen string
        ("0.150") pulls π(<τ>) through the LM's reads of the prompt in ways the basis cannot undo (de→en:
        unseen budgets called at under half their rate with the value read; docs/any-budget.md). Hidden,
        the budget's only path is ordinal by construction.

        ``hint="tenths"`` writes the budget rounded down to a tenth over the start of the hidden number
        ("0.1" for 0.100 … 0.175, the rest of its pieces unknown), so the LM's tokens can change with a
        coarse budget, as a keyword student's do with its keyword, while every budget of a tenth (seen in
        training or not) reads one string."""
        if hint not in LM_BUDGET_HINTS:
            raise ValueError(f"the LM's budget hint must be one of {list(LM_BUDGET_HINTS)}, got {hint!r}")
        if self.budget_tokenizer is None:
            raise ValueError("hide_budget_from_lm hides the number the value read takes over: call "
                             "read_budget_value (TrainConfig read_budget_value: true) first")
        tokenizer = self.budget_tokenizer
        if tokenizer.unk_token_id is None:
            raise ValueError(f"hide_budget_from_lm replaces the number with the tokenizer's unknown token, and "
                             f"{type(tokenizer).__name__} has none")
        pieces = [tokenizer.convert_tokens_to_string([p]).strip() if p is not None else "?"
                  for p in tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))]
        self._number_pieces = torch.tensor([all(c.isdigit() or c == "." for c in p) for p in pieces])
        self._digit_pieces = torch.tensor([any(c.isdigit() for c in p) for p in pieces])
        # A piece that goes on from a number: a tokenizer may merge its last digits with what follows ("4,").
        self._number_tails = torch.tensor([bool(p) and (p[0].isdigit() or p[0] == ".") for p in pieces])
        tenths_hints = self._tenths_hint_pieces() if hint == "tenths" else None  # may refuse: before any flag is set
        self.hide_budget_from_lm = True
        self.lm_budget_hint = hint
        self._tenths_hints = tenths_hints

    def lm_prompt_ids(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """The prompt ids the LM reads: as given, or (:meth:`hide_budget`) with the budget's number, the first
        run of number pieces that holds a digit (the budget clause opens the prompt), replaced token for token
        by the unknown token: the run keeps its length, so nothing after it moves. (Its length, 4 to 6 pieces
        with the de→en tokenizer, is all the LM can still tell budgets apart by.)"""
        if not self.hide_budget_from_lm:
            return prompt_ids
        assert self._number_pieces is not None and self._digit_pieces is not None and self._number_tails is not None
        assert self.budget_tokenizer is not None
        stated = self.budget_values(prompt_ids)  # every prompt states one (else a clear error), so holds a digit
        ids = prompt_ids.clone()
        cpu = prompt_ids.cpu().clamp(0, self.vocab_size - 1)
        number, digit, tail = self._number_pieces[cpu], self._digit_pieces[cpu], self._number_tails[cpu]
        for row in range(ids.shape[0]):
            start, end = _first_number_span(number[row], digit[row])
            if number[row, end] and end + 1 < ids.shape[1] and tail[row, end + 1]:
                end += 1  # the number's last digits merged with what follows ("0.00" "4,"): hidden with it
            hidden = str(self.budget_tokenizer.decode(prompt_ids[row, start : end + 1].tolist())).replace(" ", "")
            written = re.match(r"[0-9]+(?:\.[0-9]+)?", hidden)
            if written is None or abs(float(written[0]) - float(stated[row])) > 1e-9:
                raise ValueError(f"prompt {row} of the batch: the first number in it ({hidden!r}) is not the budget it "
                                 f"states ({float(stated[row]):g}); hide_budget_from_lm expects the budget clause to open "
                                 "the prompt")
            ids[row, start : end + 1] = self.budget_tokenizer.unk_token_id
            if self._tenths_hints is not None:
                hint = self._tenths_hints[int(math.floor(float(stated[row]) * 10 + 1e-9))]
                if len(hint) > end + 1 - start:
                    raise ValueError(f"prompt {row} of the batch: its budget's tenths hint takes {len(hint)} pieces, more "
                                     f"than the {end + 1 - start} of the number it replaces ({hidden!r}); expected a "
                                     "budget written to three places (budget_style 'numeric-fixed')")
                ids[row, start : start + len(hint)] = torch.tensor(hint, dtype=ids.dtype)
        return ids

    def _tenths_hint_pieces(self) -> list[list[int]]:
        """For each tenth t = 0 … 10, the pieces that write "t/10" to one place ("0.1") in the budget clause, as
        the tokenizer splits them there (found by the same scan as the number they stand in for)."""
        assert self.budget_tokenizer is not None and self._number_pieces is not None and self._digit_pieces is not None
        hints = []
        for tenth in range(11):
            written = f"{tenth / 10:.1f}"
            ids = torch.tensor(self.budget_tokenizer(NUMERIC_BUDGET_TEMPLATE.format(
                value=written, instruction="x", source="y"))["input_ids"])
            start, end = _first_number_span(self._number_pieces[ids], self._digit_pieces[ids])
            pieces = ids[start : end + 1].tolist()
            if str(self.budget_tokenizer.decode(pieces)).replace(" ", "") != written:
                raise ValueError(f"lm_budget_hint 'tenths' needs a tokenizer that writes {written!r} in the budget "
                                 f"clause as pieces of its own, but this one gives {self.budget_tokenizer.decode(pieces)!r}")
            hints.append(pieces)
        return hints

    def encode(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        return super().encode(self.lm_prompt_ids(prompt_ids), prompt_mask)

    def read_prompt(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, steps: int, encoded: torch.Tensor | None = None
    ) -> PromptPass:
        return super().read_prompt(self.lm_prompt_ids(prompt_ids), prompt_mask, steps, encoded)

    def begin(
        self, decoder: IncrementalDecoding, rows: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[PromptFeatures, torch.Tensor]:
        # The LM reads the hidden prompt; the value read parses the budget from the prompt as given.
        states, mask, first = self.family.restart_rows(self.model, decoder, rows, self.lm_prompt_ids(prompt_ids), prompt_mask)
        return self.prompt_features(states, mask, prompt_ids), first

    def head(self, decoder_states: torch.Tensor, prompt: PromptFeatures) -> torch.Tensor:
        """Logits over V + 1 actions from final states ``[B, (T,) d]`` and the prompt's features."""
        token_logits = self.family.lm_head_logits(self.model, decoder_states)
        dtype = self.call_head.weight.dtype
        log_probs = torch.log_softmax(token_logits.detach().to(dtype), dim=-1)
        entropy = -torch.linalg.vecdot(log_probs.exp(), log_probs)
        confidence = torch.stack([log_probs.max(dim=-1).values, entropy], dim=-1)
        call_bias = prompt.call_bias if decoder_states.dim() == 2 else prompt.call_bias[:, None]
        call_logit = self.call_head(decoder_states.to(dtype)) + self.call_confidence(confidence) + call_bias
        return torch.cat([token_logits, call_logit.to(token_logits.dtype)], dim=-1)

    def state_features(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, state_ids: torch.Tensor, state_mask: torch.Tensor
    ) -> tuple[torch.Tensor, PromptFeatures]:
        """One teacher-forced pass: the final states ``[B, T+1, d]`` of s_0..s_T and the prompt's features."""
        read = self.read_prompt(prompt_ids, prompt_mask, state_ids.shape[1] + 1)
        prompt = self.prompt_features(read.states, read.mask, prompt_ids)
        return self.stream_states(read, prompt.summary, state_ids, state_mask), prompt

    def forward(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, state_ids: torch.Tensor, state_mask: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, V+1]``: position i is π(· | X^(in)_<i, Y), i.e. the distribution of action i.

        ``positions`` (bool ``[B, T]``): the logits ``[N, V+1]`` of those positions only, in row-major
        order. Why: the head's work (the LM head, the confidence read and the log-softmax a loss takes
        after it) is over V at every position, and a padded batch of short outputs is mostly padding.
        """
        states, prompt = self.state_features(prompt_ids, prompt_mask, state_ids, state_mask)
        if positions is None:
            return self.head(states[:, :-1], prompt)
        if positions.dtype != torch.bool or positions.shape != state_ids.shape:
            raise ValueError(f"positions must be a bool mask of the states' shape {tuple(state_ids.shape)}, "
                             f"got {positions.dtype} {tuple(positions.shape)}")
        rows = positions.nonzero()[:, 0]
        return self.head(states[:, :-1][positions], PromptFeatures(prompt.summary[rows], prompt.call_bias[rows]))

    @torch.no_grad()
    def token_logits(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, state_ids: torch.Tensor, state_mask: torch.Tensor
    ) -> torch.Tensor:
        """The first V columns of :meth:`forward` (``[B, T, V]``, no gradient) without the <τ> head: what
        the phase-1 oracle ranks positions by, at the cost of the LM alone."""
        states, _ = self.state_features(prompt_ids, prompt_mask, state_ids, state_mask)
        return self.family.lm_head_logits(self.model, states[:, :-1])

    def step_head(self, decoder: IncrementalDecoding, ids: torch.Tensor, prompt: PromptFeatures) -> torch.Tensor:
        """``[B, V+1]`` logits of one incremental step that feeds X^(in) tokens ``ids`` to ``decoder``.

        ``prompt`` is what :meth:`begin` returned (computed once per episode).
        """
        return self.head(self.step_states(decoder, ids, prompt), prompt)

    def rollout(self, num_rows: int, max_episode_len: int) -> PolicyRollout:
        return PolicyRollout(self, num_rows, max_episode_len)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        """Write the LM (``save_pretrained``, safetensors) and β/<τ> head to ``directory``, with the family."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        extra = {
            "prompt_summary.weight": self.prompt_summary.weight.detach().contiguous().cpu(),
            "beta": self.state_embedding.beta.detach().contiguous().cpu(),
            "call_head.weight": self.call_head.weight.detach().contiguous().cpu(),
            "call_head.bias": self.call_head.bias.detach().contiguous().cpu(),
            "call_confidence.weight": self.call_confidence.weight.detach().contiguous().cpu(),
            "call_prompt.weight": self.call_prompt.weight.detach().contiguous().cpu(),
        }
        if self.prompt_query is not None:
            extra["prompt_query"] = self.prompt_query.detach().contiguous().cpu()
        if self.call_budget is not None and self.budget_tokenizer is not None:
            extra["call_budget.weight"] = self.call_budget.weight.detach().contiguous().cpu()
            self.budget_tokenizer.save_pretrained(str(directory / BUDGET_TOKENIZER))
        save_file(extra, str(directory / EXTRA_WEIGHTS))
        (directory / EXTRA_CONFIG).write_text(
            json.dumps({"vocab_size": self.vocab_size, "format": 1, "family": self.family.name,
                        "prompt_read": "mean" if self.prompt_query is None else "attention",
                        "budget_value_read": self.budget_tokenizer is not None,
                        "budget_hidden_from_lm": self.hide_budget_from_lm, "lm_budget_hint": self.lm_budget_hint})
        )
        if self.call_thresholds:
            write_call_rule(directory, self.call_thresholds)

    @classmethod
    def load(
        cls, directory: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
        family: str | ModelFamily | None = None,
    ) -> StudentPolicy:
        """Load a policy written by :meth:`save`, or wrap a plain LM directory (fresh β/<τ> head).

        ``family`` (a name in :data:`~tw_env.families.FAMILIES` or a family): the family the caller
        expects, e.g. its task's; a policy of another family is refused. A directory whose LM is not
        of the family its policy was saved with (an LM written over it) is refused too.
        """
        directory = Path(directory)
        expected = _resolve_family(family)
        config_path = directory / EXTRA_CONFIG
        recorded = json.loads(config_path.read_text()) if config_path.exists() else {}
        policy = cls(load_model(str(directory), role="student", device=device, dtype=dtype))
        actual = policy.family
        what = f"the policy in {directory} is {actual.name} ({policy.model.config.model_type})"
        if "family" in recorded and recorded["family"] != actual.name:
            raise ValueError(
                f"{what}, but it was saved as {recorded['family']} ({EXTRA_CONFIG}); its LM was replaced "
                "after the policy was saved: expected the LM the policy was trained around"
            )
        if expected is not None and expected.name != actual.name:
            raise ValueError(f"{what}; expected a {expected.name} policy (its teacher and task are {expected.name})")
        if "vocab_size" in recorded and int(recorded["vocab_size"]) != policy.vocab_size:
            raise ValueError(
                f"{what} with V = {policy.vocab_size}, but it was saved with V = {recorded['vocab_size']} ({EXTRA_CONFIG})"
            )
        extra_path = directory / EXTRA_WEIGHTS
        if extra_path.exists():
            extra = load_file(str(extra_path))
            with torch.no_grad():
                policy.state_embedding.beta.copy_(extra["beta"])
                policy.call_head.weight.copy_(extra["call_head.weight"])
                policy.call_head.bias.copy_(extra["call_head.bias"])
                for name in ("prompt_summary.weight", "call_confidence.weight", "call_prompt.weight"):
                    if name in extra:  # absent from policies saved before these parts existed: keep zeros
                        policy.get_parameter(name).copy_(extra[name])
                if "prompt_query" in extra:  # a policy that reads its prompt by attention
                    policy.read_prompt_by_attention(extra["prompt_query"])
            if "call_budget.weight" in extra:  # a policy that reads the budget's value
                from transformers import AutoTokenizer  # the tokenizer the policy saved beside its weights

                policy.read_budget_value(AutoTokenizer.from_pretrained(str(directory / BUDGET_TOKENIZER)),
                                         extra["call_budget.weight"])
                if recorded.get("budget_hidden_from_lm"):
                    policy.hide_budget(recorded.get("lm_budget_hint", "none"))
        policy.call_thresholds = read_call_rule(directory)
        return policy.to(policy.model.device)


def _first_number_span(number: torch.Tensor, digit: torch.Tensor) -> tuple[int, int]:
    """``(start, end)``, inclusive, of the first run of number pieces (``number``, [T] bool) in a row of prompt
    pieces that holds a digit (``digit``, [T] bool; the row must hold one)."""
    start = end = int(digit.nonzero()[0])
    while start > 0 and number[start - 1]:
        start -= 1
    while end + 1 < len(number) and number[end + 1]:
        end += 1
    return start, end


def write_call_rule(directory: str | Path, thresholds: dict[float, float], report: dict | None = None) -> None:
    """Write the checkpoint's call rule (:attr:`StudentPolicy.call_thresholds`, and how it was found)
    to ``directory/call_rule.json`` atomically."""
    for b, c in thresholds.items():
        if not (0.0 <= b <= 1.0 and 0.0 <= c <= 1.0):
            raise ValueError(f"a call rule maps budgets in [0, 1] to thresholds in [0, 1], got {b} -> {c}")
    write_json(Path(directory) / CALL_RULE, {
        "rule": "call iff π(<τ>) > threshold[budget]; ½ at any other budget",
        "thresholds": [[float(b), float(c)] for b, c in sorted(thresholds.items())], **(report or {})})


def read_call_rule(directory: str | Path) -> dict[float, float]:
    """The call thresholds a policy folder holds (``call_rule.json``); none: an empty rule (c = ½)."""
    path = Path(directory) / CALL_RULE
    if not path.exists():
        return {}
    try:
        thresholds = {float(b): float(c) for b, c in json.loads(path.read_text())["thresholds"]}
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a call rule (expected {{\"thresholds\": [[budget, threshold], ...]}}): {error}") from error
    for b, c in thresholds.items():
        if not (0.0 <= b <= 1.0 and 0.0 <= c <= 1.0):
            raise ValueError(f"{path}: thresholds must map budgets in [0, 1] to probabilities in [0, 1], got {b} -> {c}")
    return thresholds


def _resolve_family(family: str | ModelFamily | None) -> ModelFamily | None:
    if family is None or isinstance(family, ModelFamily):
        return family
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    return FAMILIES[family]


class ValueNetwork(_StateModel):
    """V(X^(in)_<i, Y): the student's architecture (a copy of its weights) with a scalar head."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model)
        self.value_head = nn.Linear(model.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_policy(cls, policy: StudentPolicy) -> ValueNetwork:
        value = cls(copy.deepcopy(policy.model))
        with torch.no_grad():
            value.state_embedding.beta.copy_(policy.state_embedding.beta)
            value.prompt_summary.weight.copy_(policy.prompt_summary.weight)
            if policy.prompt_query is not None:  # its states start from the policy's prompt read
                value.read_prompt_by_attention(policy.prompt_query)
        return value.to(policy.device)

    def forward(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, state_ids: torch.Tensor, state_mask: torch.Tensor
    ) -> torch.Tensor:
        """Values ``[B, T+1]`` of the states s_0..s_T."""
        states = self.decoder_states(prompt_ids, prompt_mask, state_ids, state_mask)
        return self.value_head(states.to(self.value_head.weight.dtype)).squeeze(-1)


def call_log_probability(logits: torch.Tensor) -> torch.Tensor:
    """log π(<τ>) ``[N]`` from π's logits ``[N, V+1]`` (float32): what a greedy call decision compares
    with log c."""
    return torch.log_softmax(logits.float(), dim=-1)[:, -1]


def choose_actions(logits: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None,
                   call_threshold: float | torch.Tensor = 0.5, call_logprob: torch.Tensor | None = None) -> torch.Tensor:
    """Actions ``[N]`` from π's logits ``[N, V+1]``: first whether to call, then which token.

    The call is drawn with probability π(<τ>) sharpened by the temperature T,
    σ((z_τ − logsumexp z_V) / T); otherwise a token is drawn from softmax(z_V / T). At T = 1 this
    is exactly a draw from softmax over all V + 1 actions. At T = 0 (greedy) it calls iff
    π(<τ>) > ``call_threshold`` (½, the policy's own decision, unless a threshold was calibrated
    per budget: :func:`agents.evaluation.calibrate_call_threshold`) and otherwise takes the most
    likely token. The threshold applies only to greedy decisions.

    Why not argmax over V + 1: where the student's own distribution is flat (its top token at a few
    per cent) a small π(<τ>) still wins the argmax, so a policy whose π(<τ>) averages 0.01 under
    "no teacher use" would call at one token in eight. Deciding the call first keeps greedy teacher
    use equal to the policy's calibrated call probability.

    ``call_threshold`` may be a tensor ``[N]``, one threshold per row (rows of different budgets).
    ``call_logprob``: :func:`call_log_probability` of ``logits`` when the caller has it already (greedy only).
    """
    if logits.dim() != 2 or logits.shape[-1] < 2:
        raise ValueError(f"logits must be [N, V+1] with the <τ> logit last, got shape {tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    log_threshold: torch.Tensor | float
    if isinstance(call_threshold, torch.Tensor):
        if tuple(call_threshold.shape) != (logits.shape[0],):
            raise ValueError(f"call_threshold as a tensor must hold one threshold per row, shape ({logits.shape[0]},), "
                             f"got {tuple(call_threshold.shape)}")
        if not bool(((call_threshold >= 0) & (call_threshold <= 1)).all()):
            raise ValueError(f"call_threshold must be a probability in [0, 1], got {call_threshold}")
        log_threshold = torch.log(call_threshold.to(logits.device, torch.float32))  # log 0 = −inf
    else:
        if not 0.0 <= call_threshold <= 1.0:
            raise ValueError(f"call_threshold must be a probability in [0, 1], got {call_threshold}")
        log_threshold = math.log(call_threshold) if call_threshold > 0 else -math.inf
    logits = logits.float()
    token_logits = logits[:, :-1]
    if temperature == 0:
        # π(<τ>) > threshold, compared in log space (threshold 0: log 0 = −inf, calls wherever π(<τ>) > 0).
        call = (call_log_probability(logits) if call_logprob is None else call_logprob) > log_threshold
        token = token_logits.argmax(dim=-1)
    else:
        call_margin = logits[:, -1] - torch.logsumexp(token_logits, dim=-1)  # log π(<τ>) − log(1 − π(<τ>))
        if generator is None:
            raise ValueError("sampling (temperature > 0) needs a torch.Generator")
        u = torch.rand(len(logits), generator=generator, device=generator.device).to(logits.device)
        call = u < torch.sigmoid(call_margin / temperature)
        token = _sample_categorical(token_logits / temperature, generator)
    return token.masked_fill(call, logits.shape[-1] - 1)


def _sample_categorical(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row from softmax(logits), by inverse CDF (much faster than multinomial on large V)."""
    cdf = torch.cumsum(torch.softmax(logits.float(), dim=-1), dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=generator.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u.to(cdf.device)).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def observation_tensors(obs: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Batched env observations as tensors: prompt ids/mask trimmed to the longest prompt."""
    prompt_length = torch.as_tensor(np.asarray(obs["prompt_length"]).reshape(-1), device=device).long()
    width = max(int(prompt_length.max()), 1)
    prompt_ids = torch.as_tensor(np.asarray(obs["prompt_ids"])[:, :width], device=device).long()
    prompt_mask = (torch.arange(width, device=device)[None] < prompt_length[:, None]).long()
    state_length = torch.as_tensor(np.asarray(obs["state_length"]).reshape(-1), device=device).long()
    state_ids = torch.as_tensor(np.asarray(obs["state_ids"]), device=device).long()
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "state_ids": state_ids, "state_length": state_length}


class IncrementalReader:
    """A :class:`_StateModel` read incrementally over a fixed set of rows, one step per environment step
    (its family's KV-cached incremental decoder).

    Rows whose observation has ``state_length == 0`` start a new episode (a reset or a NEXT_STEP
    autoreset): their prompt is read once (T5's encoder; a causal LM's prefill); every other row feeds
    only its newest X^(in) token. The one reader behind :class:`PolicyRollout` (acting) and the SB3
    policy's :class:`~agents.sb3_adapter.IncrementalStates`.
    """

    def __init__(self, model: _StateModel, num_rows: int, max_episode_len: int) -> None:
        self.model = model
        self.decoder = model.family.incremental_decoder(model.model, num_rows, max_episode_len)
        self.prompt: PromptFeatures | None = None  # per row, refreshed when a row's episode starts
        self.first: torch.Tensor | None = None  # per row: the token its first step reads

    def restart(self, rows: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """Begin episodes in ``rows`` with right-padded prompts (the first restart covers every row: the decoder insists)."""
        fresh, first = self.model.begin(self.decoder, rows, prompt_ids, prompt_mask)
        if self.prompt is None or self.first is None:
            self.prompt, self.first = fresh, first
        else:
            self.prompt.assign(rows, fresh)
            self.first[rows] = first.to(self.first.device)

    def step(self, t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, PromptFeatures]:
        """One step at observations ``t`` (``state_length``, ``state_ids``, ``prompt_ids``, ``prompt_mask``):
        the final states ``[N, d]`` after each row's prefix, and the rows' prompt features."""
        length = t["state_length"]
        new = torch.nonzero(length == 0).squeeze(-1)
        if len(new):
            self.restart(new, t["prompt_ids"][new], t["prompt_mask"][new])
        if self.prompt is None or self.first is None:
            raise RuntimeError("the first observations must start an episode in every row (state_length 0)")
        last = t["state_ids"].gather(1, (length - 1).clamp(min=0)[:, None]).squeeze(1)
        tokens = torch.where(length == 0, self.first.to(last.device), last)
        return self.model.step_states(self.decoder, tokens, self.prompt), self.prompt

    def catch_up(self, t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, PromptFeatures]:
        """Restart every row and read its whole X^(in) prefix in one teacher-forced step, then roll back
        what each row read past its own prefix (padding): the final states ``[N, d]`` and prompt features."""
        length = t["state_length"]
        rows = torch.arange(len(length), device=length.device)
        self.restart(rows, t["prompt_ids"], t["prompt_mask"])
        if self.prompt is None or self.first is None:
            raise RuntimeError("restart() of every row sets the prompt features")
        width = int(length.max())
        stream = torch.cat([self.first[:, None].to(t["state_ids"].dtype), t["state_ids"][:, :width]], dim=1)
        states = self.model.step_states(self.decoder, stream, self.prompt)  # [N, width + 1, d]
        self.decoder.rollback(width - length)
        return states[rows, length], self.prompt


class PolicyRollout:
    """Incremental π for acting (an :class:`IncrementalReader` of the policy): call :meth:`logits`
    exactly once per environment step."""

    def __init__(self, policy: StudentPolicy, num_rows: int, max_episode_len: int) -> None:
        self.policy = policy
        self.reader = IncrementalReader(policy, num_rows, max_episode_len)

    @torch.no_grad()
    def logits(self, obs: dict[str, np.ndarray]) -> torch.Tensor:
        """``[N, V+1]`` action logits for the current observations."""
        states, prompt = self.reader.step(observation_tensors(obs, self.policy.device))
        return self.policy.head(states, prompt).float()
