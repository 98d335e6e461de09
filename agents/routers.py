"""The published token routers, as baselines beside Training Wheels: Co-LLM's learnt deferral and Big Little
Decoder's fallback with rollback. Both decode greedily, batched, with KV caches on both sides (the
family's incremental decoders), and return the :class:`~agents.decoding.DecodeResult` every decoder
returns, so that `tw eval` measures them in the same columns.

- **Co-LLM** (Shen, Lang, Wang, Sontag, ACL 2024; code clinicalml/co-llm): a deferral head on the
  student's final states gives P(Z_t = 1), the probability that the teacher writes token t
  (:class:`CoLLMRouter`). It is trained by ``tw co-llm`` (:mod:`agents.co_llm`) on the reference outputs by
  maximising their marginal likelihood with Z_t summed out (:func:`~agents.objectives.collm_marginal_nll`).
  At test time (:func:`co_llm_decode`) the teacher writes token t where P(Z_t = 1) > η
  (:func:`~agents.objectives.collm_defers`); otherwise the student's argmax. Like Training Wheels, the
  teacher is idle until some row defers and then reads what it has not seen in one forward.
- **BiLD** (Kim, Mangalam, Moon, Malik, Mahoney, Gholami, Keutzer, NeurIPS 2023; code
  kssteven418/BigLittleDecoder, ``T5BiLDModel._greedy_search_body``), :func:`bild_decode`: the large
  model writes the first token; then the small model writes greedily until its top probability falls
  below α_FB (that token is dropped) or it has written ``small_iters`` tokens in a row; then the
  large model reads every token since its last pass in one forward and **rolls back** to the first
  small token whose negative log-likelihood under it exceeds α_RB
  (:func:`~agents.objectives.bild_rollback_position`), replacing it by its own argmax (the discarded
  tokens are wasted; the large model then also writes the token after its replacement in a pass of
  its own, as the official loop does); without a rollback it writes the token after them. As in the
  official loop, a row that the small model ends (EOS or the length limit) is not checked again. One
  difference: a token over α_RB that is the large model's own argmax is kept and the tokens after it
  are still checked (the official loop, finding that its replacement would be the same token, skips
  the rollback and checks none of the later ones).

Counted as everywhere: teacher tokens (from the large model), teacher forwards (one per large pass
over the batch), student forwards, and BiLD's wasted (rolled-back) tokens per row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from agents.decoding import (
    DecodeResult,
    _CatchUpTeacher,
    _check_inputs,
    _eval_mode,
    _Outputs,
    _start_pair,
)
from agents.objectives import bild_rollback_position, collm_defers, confidence_fallback
from tw_env.atomic import publish_dir, write_json
from tw_env.families import IncrementalDecoding, family_of
from tw_env.models import load_model, output_vocab_size

ROUTER_WEIGHTS = "co_llm_deferral.safetensors"
ROUTER_CONFIG = "co_llm.json"


# --------------------------------------------------------------------------------------------- Co-LLM


class CoLLMRouter(nn.Module):
    """A student LM with Co-LLM's deferral head: one logit d_t = w·h_t per position, read from the final
    state h_t that the LM head reads (in the official code an extra row of the output embedding, the
    same linear read). σ(d_t) is P(Z_t = 1): the teacher writes token t.

    ``forward(prompt_ids, prompt_mask, tokens)`` is one teacher-forced pass over reference outputs
    ``tokens`` ``[B, T]``: the student's logits ``[B, T, V]`` and the deferral logits ``[B, T]`` of each
    token, read as the family reads a prompt and a stream (T5: encoder, then the decoder from its start
    token; causal: a prefill of the prompt, then the stream from its last token), so the states are those
    the incremental decoder gives at test time.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        family_of(model)  # refuses a model of neither family, naming its type
        self.model = model
        self.vocab_size = output_vocab_size(model)
        self.deferral = nn.Linear(model.config.hidden_size, 1, bias=False)
        nn.init.zeros_(self.deferral.weight)  # P(Z = 1) = ½ everywhere until the initialisation fits it
        self.prompt: str | None = None  # the prompt template it was trained on (``co_llm.json``), once loaded

    @property
    def device(self) -> torch.device:
        return self.model.device

    def deferral_logits(self, states: torch.Tensor) -> torch.Tensor:
        """d for final states ``[..., d_model]``: ``[...]`` (float32)."""
        return self.deferral(states.to(self.deferral.weight.dtype)).squeeze(-1).float()

    def states(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, d]``: the final state h_t from which the LM predicts token t of ``tokens`` (teacher-forced)."""
        family = family_of(self.model)
        prompt = family.read_prompt(self.model, prompt_ids, prompt_mask, tokens.shape[1] + 1)
        stream = torch.cat([prompt.first[:, None].to(tokens.dtype), tokens], dim=1)  # [first ; x_1 … x_T]
        embeds = self.model.get_input_embeddings()(stream)
        return family.read_stream(self.model, prompt, embeds, torch.ones_like(tokens))[:, :-1]

    def student_logits(self, states: torch.Tensor) -> torch.Tensor:
        """The LM head's logits ``[..., V]`` for final states, as the model's own forward applies it."""
        return family_of(self.model).lm_head_logits(self.model, states)

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's logits ``[B, T, V]`` and the deferral logits ``[B, T]`` for each token of ``tokens``."""
        states = self.states(prompt_ids, prompt_mask, tokens)
        return self.student_logits(states), self.deferral_logits(states)

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
             extra: dict[str, Any] | None = None) -> None:
        """A router directory, published atomically: the LM as a plain transformers model (safetensors;
        loadable alone), the deferral head (safetensors) and ``co_llm.json``; the tokenizer if given."""

        def build(target: Path) -> None:
            self.model.save_pretrained(target)
            if tokenizer is not None:
                tokenizer.save_pretrained(target)
            save_file({"weight": self.deferral.weight.detach().cpu().contiguous()}, str(target / ROUTER_WEIGHTS))
            write_json(target / ROUTER_CONFIG, {"family": family_of(self.model).name,
                                                "hidden_size": int(self.model.config.hidden_size), **(extra or {})})

        publish_dir(Path(folder), build)

    @classmethod
    def load(cls, source: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> CoLLMRouter:
        """A router saved by :meth:`save` (``tw co-llm``'s ``OUTPUT_DIR/best``), in eval mode."""
        folder = Path(source)
        weights = folder / ROUTER_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{folder} holds no Co-LLM deferral head ({ROUTER_WEIGHTS}); expected a "
                                    "directory written by tw co-llm (its OUTPUT_DIR/best)")
        router = cls(load_model(str(folder), role="co_llm_router", device=device, dtype=dtype))
        state = load_file(str(weights), device=str(router.device))
        if tuple(state["weight"].shape) != tuple(router.deferral.weight.shape):
            raise ValueError(f"{weights}: deferral weight of shape {tuple(state['weight'].shape)}, expected "
                             f"{tuple(router.deferral.weight.shape)} for a model of hidden size {router.model.config.hidden_size}")
        router.deferral.weight.data.copy_(state["weight"])
        record = folder / ROUTER_CONFIG
        router.prompt = json.loads(record.read_text()).get("prompt") if record.is_file() else None
        return router.to(router.device).eval()


@torch.no_grad()
def co_llm_decode(
    router: CoLLMRouter,
    teacher: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    threshold: float,
) -> DecodeResult:
    """Co-LLM's greedy decoding: at each token the teacher writes its argmax where σ(d_t) > η
    (``threshold``), the student its own argmax elsewhere. η = 1 never defers; η = 0 always does."""
    _check_inputs(input_ids, attention_mask, max_new_tokens)
    model, input_ids, attention_mask, out = _start_pair(router.model, teacher, input_ids, attention_mask,
                                                        max_new_tokens, "Co-LLM router")
    batch_size = input_ids.shape[0]
    with _eval_mode(router, teacher):
        family = family_of(model)
        student = family.incremental_decoder(model, batch_size, max_new_tokens + 1)
        context, context_mask, token = family.restart_batch(model, input_ids, attention_mask)
        student.restart(torch.arange(batch_size), context, context_mask)
        helper = _CatchUpTeacher(teacher, input_ids.to(teacher.device), attention_mask.to(teacher.device), max_new_tokens)
        forwards = 0
        for n in range(max_new_tokens):
            if bool(out.done.all()):
                break
            states = student.step(input_ids=token)  # [B, d]
            forwards += 1
            defer = collm_defers(router.deferral_logits(states), threshold) & ~out.done
            own = student.logits(states).argmax(dim=-1)
            token = out.emit(helper.replace(own, defer, out.tokens[:, :n]), defer)
    return out.result(helper.forwards, forwards)


# --------------------------------------------------------------------------------------------- BiLD


def _read_stream(decoder: IncrementalDecoding, stream: torch.Tensor, read: torch.Tensor, want: torch.Tensor,
                 pad_id: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Feed each row b of ``decoder`` the stream tokens ``stream[b, read[b] : want[b]]`` in one forward
    (rows with fewer are padded, and the padding forgotten again). Returns the final states ``[B, C, d]``
    (None when no row reads anything) and the count per row; the state after a row's last token is at
    column count − 1."""
    count = (want - read).clamp(min=0)
    width = int(count.max())
    if width == 0:
        return None, count
    column = torch.arange(width, device=stream.device)[None, :]
    index = (read[:, None] + column).clamp(max=stream.shape[1] - 1)
    ids = torch.where(column < count[:, None], stream.gather(1, index), torch.full_like(index, pad_id))
    states = decoder.step(input_ids=ids)
    decoder.rollback(width - count)
    return states, count


class _BiLD:
    """Big Little Decoder's state over a batch: both caches, how far each has read each row's stream
    ``[first ; x_1 … x_L]``, which rows the large model writes next, and what was wasted."""

    def __init__(self, small: PreTrainedModel, large: PreTrainedModel, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, out: _Outputs, small_iters: int) -> None:
        batch_size, device = input_ids.shape[0], input_ids.device
        self.out, self.small_iters = out, small_iters
        # A catch-up reads at most small_iters + 2 tokens a row; the margin is for the padding of shorter rows.
        max_len = out.max_new_tokens + 2 * (small_iters + 2) + 4
        family = family_of(small)
        self.small = family.incremental_decoder(small, batch_size, max_len)
        self.large = family.incremental_decoder(large, batch_size, max_len)
        rows = torch.arange(batch_size, device=device)
        small_context, small_mask, self.small_first = family.restart_batch(small, input_ids, attention_mask)
        large_context, large_mask, large_first = family.restart_batch(
            large, input_ids.to(large.device), attention_mask.to(large.device))
        self.large_first = large_first.to(device)
        self.small.restart(rows, small_context, small_mask)
        self.large.restart(rows.to(large.device), large_context, large_mask)
        self.small_read = torch.zeros(batch_size, dtype=torch.long, device=device)  # stream tokens in the cache
        self.large_read = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.large_next = torch.ones(batch_size, dtype=torch.bool, device=device)  # the large model writes first
        self.wasted = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.teacher_forwards = self.student_forwards = 0

    def stream(self, first: torch.Tensor) -> torch.Tensor:
        return torch.cat([first[:, None], self.out.tokens], dim=1)

    def cycle(self, fallback_threshold: float, rollback_threshold: float) -> None:
        """The small model writes until it falls back or has written ``small_iters`` tokens; then one large pass."""
        self._draft(fallback_threshold)
        if not bool(self.out.done.all()):
            self._large_pass(rollback_threshold)

    def _draft(self, fallback_threshold: float) -> None:
        out, pad = self.out, self.out.pad_id
        active = ~out.done & ~self.large_next
        written = torch.zeros_like(self.small_read)
        while bool(active.any()):
            want = torch.where(active, out.lengths + 1, self.small_read)
            states, count = _read_stream(self.small, self.stream(self.small_first), self.small_read, want, pad)
            assert states is not None  # an active row always has its newest token to read
            self.small_read = torch.maximum(self.small_read, want)
            last = states.gather(1, (count - 1).clamp(min=0)[:, None, None].expand(-1, 1, states.shape[-1]))[:, 0]
            logp = F.log_softmax(self.small.logits(last).float(), dim=-1)
            self.student_forwards += 1
            unsure = (torch.ones_like(active) if fallback_threshold > 1.0 else confidence_fallback(logp, fallback_threshold))
            accept = active & ~unsure  # an unsure row's token is dropped: the large model writes it
            out.append_block(logp.argmax(dim=-1)[:, None], accept.long(), torch.zeros_like(accept)[:, None])
            written += accept.long()
            active = accept & ~out.done & (written < self.small_iters)

    def _large_pass(self, rollback_threshold: float) -> None:
        out, pad = self.out, self.out.pad_id
        need = ~out.done
        before = self.large_read.clone()
        want = torch.where(need, out.lengths + 1, self.large_read)
        states, count = _read_stream(self.large, self.stream(self.large_first).to(self.large.device),
                                     before.to(self.large.device), want.to(self.large.device), pad)
        assert states is not None
        count = count.to(out.tokens.device)
        logp = F.log_softmax(self.large.logits(states).float(), dim=-1).to(out.tokens.device)  # [B, C, V]
        self.teacher_forwards += 1
        best = logp.argmax(dim=-1)  # [B, C]
        # Column j read stream token before + j and predicts output token before + j + 1 (1-based), i.e.
        # out.tokens[:, before + j]; the first count − 1 of them are the small tokens since the last pass.
        width = logp.shape[1]
        column = torch.arange(width, device=logp.device)[None, :]
        checked = column < (count - 1)[:, None]
        target_index = (before[:, None] + column).clamp(max=out.tokens.shape[1] - 1)
        targets = out.tokens.gather(1, target_index)
        nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
        kept = bild_rollback_position(torch.where(checked, nll, torch.zeros_like(nll)), checked, rollback_threshold,
                                      large_argmax=best == targets)
        replacement = best.gather(1, kept[:, None]).squeeze(1)
        roll = need & (kept < count - 1)
        next_token = best.gather(1, (count - 1).clamp(min=0)[:, None]).squeeze(1)
        keep_length = before + kept  # output tokens kept on a rollback
        self.wasted += torch.where(roll, out.lengths - keep_length, torch.zeros_like(keep_length))
        self._truncate(roll, keep_length)
        # The large cache keeps stream tokens up to the last kept one: before + kept + 1 of them.
        self.large.rollback(torch.where(roll, count - kept - 1, torch.zeros_like(count)).to(self.large.device))
        self.large_read = torch.where(need, torch.where(roll, keep_length + 1, want), self.large_read)
        self.small.rollback(torch.where(roll, (self.small_read - keep_length - 1).clamp(min=0), torch.zeros_like(count)))
        self.small_read = torch.where(roll, torch.minimum(self.small_read, keep_length + 1), self.small_read)
        token = torch.where(roll, replacement, next_token)
        out.append_block(token[:, None], need.long(), torch.ones_like(need)[:, None])
        self.large_next = need & roll  # after a rollback the large model writes the next token too

    def _truncate(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        """Cut ``rows`` of the output back to ``lengths`` tokens (a rollback)."""
        out = self.out
        if not bool(rows.any()):
            return
        column = torch.arange(out.tokens.shape[1], device=out.tokens.device)[None, :]
        cut = rows[:, None] & (column >= lengths[:, None])
        out.tokens[cut] = out.pad_id
        out.teacher[cut] = False
        out.lengths = torch.where(rows, lengths, out.lengths)


@torch.no_grad()
def bild_decode(
    small_model: PreTrainedModel,
    teacher: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    fallback_threshold: float,
    rollback_threshold: float,
    small_iters: int = 10,
) -> DecodeResult:
    """Big Little Decoder (fallback and rollback), batched and greedy; see the module docstring.

    Args:
        small_model: the small model (the student; a StudentPolicy is decoded over V).
        teacher: the large model.
        fallback_threshold: α_FB: the large model takes over where the small model's top probability is
            below it (official default 0.6; 0 never falls back, above 1 always does).
        rollback_threshold: α_RB, nats: a small token whose NLL under the large model exceeds it is
            rolled back with everything after it (official default 5; ``math.inf`` never rolls back).
        small_iters: the most tokens the small model writes in a row before the large model runs
            (``num_small_iters``, official default 10).

    Returns a :class:`~agents.decoding.DecodeResult`: tokens the large model wrote are teacher tokens,
    ``wasted_tokens`` counts the rolled-back small tokens per row, ``teacher_forwards`` the large passes.
    """
    _check_inputs(input_ids, attention_mask, max_new_tokens)
    if not fallback_threshold >= 0:
        raise ValueError(f"fallback_threshold α_FB must be >= 0, got {fallback_threshold}")
    if not rollback_threshold >= 0:
        raise ValueError(f"rollback_threshold α_RB must be >= 0 nats (math.inf: never), got {rollback_threshold}")
    if small_iters < 1:
        raise ValueError(f"small_iters must be >= 1, got {small_iters}")
    small, input_ids, attention_mask, out = _start_pair(small_model, teacher, input_ids, attention_mask,
                                                        max_new_tokens, "small model")
    with _eval_mode(small, teacher):
        bild = _BiLD(small, teacher, input_ids, attention_mask, out, small_iters)
        while not bool(out.done.all()):
            bild.cycle(fallback_threshold, rollback_threshold)
    return out.result(bild.teacher_forwards, bild.student_forwards, bild.wasted)
