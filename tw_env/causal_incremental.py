"""The decoder-only family (causal LMs): :class:`DecoderOnlyFamily` and its incremental decoder, in which
each row of a batch restarts on its own.

Why this exists: the environment steps N episodes in lock step, with one teacher forward per step,
and episodes end at different times (autoreset). A causal teacher reads its prompt C^(T) followed
by X^(out); re-running a prefix is never allowed, so the prompt is prefilled into the KV cache once
per episode and every env step is one decoder step. Rows have prompts of different lengths and
restart, roll back and advance without disturbing each other.

How (the same interface as :class:`tw_env.incremental.IncrementalDecoder`):

- **One row, one contiguous run of cache columns, column = position.** Each row's keys and values
  live in its own row of a preallocated ``[N, kv_heads, capacity, head_dim]`` buffer per layer,
  from column 0: row b's token at position p sits in column p. ``length[b]`` is the number of
  tokens the row holds, which is also the position of its next token.
- **Positions.** Every forward passes explicit per-row ``position_ids`` (``length[b] + 0..k-1``),
  so RoPE positions are exactly those of an unbatched run: 0..L−1 for the context, then L, L+1, ...
- **Masks.** A 4D additive mask ``[N, 1, k, width]`` (0 where visible, the dtype's minimum
  elsewhere) lets the query at position q see columns 0..q of its own row (and, for sliding-window
  layers, only the last ``sliding_window`` of them). Columns past a row's own length hold stale
  values of an earlier episode or a rolled-back draft; causality hides them, and the row's next
  tokens overwrite them. No padding is ever visible, so no 2D padding mask is needed.
- **Restart** of rows R runs one forward over those rows only (their contexts right-padded to a
  common width L, positions 0..L−1, causal mask) and writes their keys/values into columns 0..L−1
  of their own buffer rows; the other rows are not touched and need no forward. A padded context
  token lands past its row's length, where causality hides it. The context is what
  :meth:`~tw_env.families.DecoderOnlyFamily.restart_inputs` returns: the prompt minus its last
  token, which the row's first step reads (as T5's decoder reads its start token).
- **Step** writes the k new tokens of every row at columns ``length[b]..length[b]+k−1`` (a scatter)
  and attends ``width = max(length) + k`` columns.
- **Rollback** of the newest ``discard[b]`` tokens of row b only rewinds ``length[b]``: the row stays
  contiguous, so the next token gets the right position and column, and the discarded keys are
  hidden by causality until they are overwritten. Exact, and nothing is copied.
- **Compaction.** Nothing is ever dropped from the middle (a row has no gaps). Attention reads only
  ``max(length) + k`` columns; the buffer grows when a longer context arrives and is trimmed when it
  holds more than twice what the rows need, so memory stays N × (longest context + episode).

Only architectures whose attention takes an explicit 4D mask and position ids run here: the eager
and SDPA attention implementations, full or sliding-window layers, an LM head applied as is
(:func:`check_supported_causal_lm` says why a model is refused). Tested on Llama, Qwen2 (with and
without sliding-window layers) and Qwen3.

The family (:data:`DECODER_ONLY`): the model reads its prompt and then the output in one sequence.
The prompt minus its last token is prefilled into the KV cache once per episode; the prompt's last
token plays the part of T5's start token (the first step reads it and yields p(x_1 | prompt)). The
policy's prompt states are the prefill's final states, and its teacher-forced pass is a prefill and
one k-token step of this same decoder. The LM head is applied as is.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, CacheLayerMixin

from tw_env.model_family import (
    IncrementalDecoding,
    ModelFamily,
    PromptPass,
    UnsupportedModelError,
    cache_keyword,
    check_non_empty,
    check_non_empty_rows,
)
from tw_env.prompts import PromptFormat

SUPPORTED_ATTENTION = ("eager", "sdpa")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_supported_causal_lm(model: PreTrainedModel) -> None:
    """Raise :class:`~tw_env.model_family.UnsupportedModelError` for a causal LM this decoder cannot run exactly."""
    config = model.config
    name = getattr(config, "model_type", type(model).__name__)
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"the {name} model uses attn_implementation={attention!r}; the causal incremental decoder passes its own "
            f"4D attention masks, which need one of {list(SUPPORTED_ATTENTION)} (load it with attn_implementation='sdpa')"
        )
    layer_types = set(getattr(config, "layer_types", None) or ())
    if not layer_types <= set(SUPPORTED_LAYER_TYPES):
        raise UnsupportedModelError(
            f"the {name} model has layer types {sorted(layer_types - set(SUPPORTED_LAYER_TYPES))}; the causal "
            f"incremental decoder supports {list(SUPPORTED_LAYER_TYPES)}"
        )
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise UnsupportedModelError(
                f"the {name} model sets {key}={getattr(config, key)!r}, which its LM head applies and the incremental "
                "decoder does not; expected a model whose logits are its LM head's output (Llama, Qwen2, Qwen3)"
            )
    if "position_ids" not in inspect.signature(model.base_model.forward).parameters:
        raise UnsupportedModelError(
            f"the {name} model takes no position_ids; the causal incremental decoder gives each row its own positions"
        )


@dataclass
class _Slots:
    """Where the forward in progress writes its new keys/values, shared by every cache layer."""

    batch_size: int
    all_rows: torch.Tensor  # arange(batch_size) on the model's device
    capacity: int = 0  # columns each layer's buffer must hold
    rows: torch.Tensor | None = None  # the rows this forward reads ([R]); None: every row
    columns: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))  # [R, k]
    width: int = 0  # columns the forward attends
    prefill: bool = False  # a restart: the forward attends its own new tokens only


class _RowLayer(CacheLayerMixin):
    """One layer's keys/values ``[N, kv_heads, capacity, head_dim]``; a forward writes its tokens at
    per-row columns (:class:`_Slots`) and attends the first ``width`` columns."""

    is_sliding = False  # the window is in the mask; every layer keeps all columns
    is_compileable = False
    is_croppable = False

    def __init__(self, slots: _Slots) -> None:
        super().__init__()
        self.slots = slots
        self._keys = torch.zeros(0)
        self._values = torch.zeros(0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self.slots.batch_size, key_states.shape[1], self.slots.capacity)
        self._keys = key_states.new_zeros((*shape, key_states.shape[-1]))
        self._values = value_states.new_zeros((*shape, value_states.shape[-1]))
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.slots
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif self._keys.shape[2] < s.capacity:
            self.resize(s.capacity)
        # .to: no-op on one device; a model spread over devices (device_map) has layers elsewhere.
        rows = (s.all_rows if s.rows is None else s.rows).to(key_states.device)
        columns = s.columns.to(key_states.device)
        if torch.is_grad_enabled():  # keep the tensors earlier forwards saved for backward intact
            self._keys, self._values = self._keys.clone(), self._values.clone()
        index = (rows[:, None], slice(None), columns)  # -> [R, k, kv_heads, head_dim]
        self._keys[index] = key_states.transpose(1, 2).to(self._keys.dtype)
        self._values[index] = value_states.transpose(1, 2).to(self._values.dtype)
        self.keys, self.values = self._keys, self._values
        if s.prefill:  # a restarted row's context attends only itself
            return key_states, value_states
        return self._keys[:, :, : s.width], self._values[:, :, : s.width]

    def resize(self, capacity: int) -> None:
        """Grow (zero-padded) or trim the buffers to ``capacity`` columns."""
        pad = capacity - self._keys.shape[2]
        if pad >= 0:
            self._keys, self._values = F.pad(self._keys, (0, 0, 0, pad)), F.pad(self._values, (0, 0, 0, pad))
        else:  # clone: a slice would keep the whole old buffer alive
            self._keys, self._values = self._keys[:, :, :capacity].clone(), self._values[:, :, :capacity].clone()
        self.keys, self.values = self._keys, self._values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots.width, 0

    def get_seq_length(self) -> int:
        return self.slots.width

    def get_max_length(self) -> int:
        return -1


class CausalIncrementalDecoder:
    """Incremental decoding state for ``batch_size`` rows of one causal LM (see the module docstring).

    Call :meth:`restart` for rows that begin a new episode with their context (right-padded ids and
    mask; a row's context may be empty), then :meth:`step` once per token with one input per row
    (token ids or embeddings). The caller chooses ``torch.no_grad()``.
    """

    def __init__(self, model: PreTrainedModel, batch_size: int, max_episode_len: int) -> None:
        check_supported_causal_lm(model)
        self.model = model
        self.batch_size = batch_size
        self.max_episode_len = max_episode_len
        self.device = model.device
        self.body = model.base_model  # the transformer without its LM head
        config = model.config
        self._mask_dtype: torch.dtype = model.dtype  # the queries' dtype: SDPA wants the mask in it
        layer_types = list(getattr(config, "layer_types", None) or ())
        window = getattr(config, "sliding_window", None)
        # Models with per-layer types take one mask per type; others one mask (windowed if they slide).
        self._mask_types = sorted(set(layer_types)) if "sliding_attention" in layer_types else None
        self._window: int | None = int(window) if window is not None and (self._mask_types or not layer_types) else None
        self.length = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # tokens held = next position
        self.read = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # tokens stepped since restart
        self._slots = _Slots(batch_size, torch.arange(batch_size, device=self.device))
        self._layers = [_RowLayer(self._slots) for _ in range(config.num_hidden_layers)]
        self.cache = Cache(layers=list(self._layers))
        self._cache_keyword = cache_keyword(self.body)
        self._restarted = False

    # ------------------------------------------------------------------ restarts
    def restart(
        self, rows: torch.Tensor | list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Begin new episodes in ``rows`` whose contexts are ``input_ids`` ([len(rows), L], right-padded).

        Returns the contexts' final states ``[len(rows), L, d]`` (what the prefill computed; zeros where
        the mask is 0, and all zeros when every context is empty): the student policy reads its prompt
        summary from them, so that the prompt is still read once per episode.
        """
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        if not self._restarted and len(rows) != self.batch_size:
            raise ValueError(f"the first restart must cover all {self.batch_size} rows, got {len(rows)}")
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        lengths = attention_mask.sum(dim=1).long()
        width = input_ids.shape[1]
        columns = torch.arange(width, device=self.device)
        if not torch.equal(attention_mask.bool(), columns[None, :] < lengths[:, None]):
            raise ValueError("restart() expects right-padded contexts: each mask row all ones, then all zeros")
        self._restarted = True
        self.length[rows] = 0
        self.read[rows] = 0
        if lengths.numel() and int(lengths.max()) > 0:
            self._reserve(max(width, int(self.length.max()) + 1))
            positions = columns[None, :].expand(len(rows), width)
            self._slots.rows, self._slots.columns, self._slots.width, self._slots.prefill = rows, positions, width, True
            try:
                hidden = self._forward(positions, {"input_ids": input_ids})
            finally:
                self._slots.rows, self._slots.prefill = None, False
            states = hidden.to(self.device) * attention_mask[..., None].to(hidden.dtype)
        else:  # nothing to prefill (one-token prompts): no forward
            states = torch.zeros(
                len(rows), width, self.model.config.hidden_size, dtype=self.model.dtype, device=self.device
            )
        self.length[rows] = lengths
        self._compact()
        return states

    # ------------------------------------------------------------------ steps
    def step(
        self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Advance every row by one token (``[B]`` ids or ``[B, d]`` embeddings): final states ``[B, d]``.

        Inputs with an extra time axis (``[B, k]`` ids or ``[B, k, d]`` embeddings) advance every row
        by k tokens in one forward, as a verifier or a catching-up teacher does; then ``[B, k, d]``.
        """
        if not self._restarted:
            raise RuntimeError("restart() must be called for every row before step()")
        inputs = input_ids if inputs_embeds is None else inputs_embeds
        if inputs is None:
            raise TypeError("step() needs input_ids or inputs_embeds")
        single = inputs.dim() == (1 if inputs_embeds is None else 2)  # no time axis
        inputs = inputs[:, None] if single else inputs
        k = inputs.shape[1]
        positions = self.length[:, None] + torch.arange(k, device=self.device)[None, :]
        width = int(self.length.max()) + k
        self._reserve(width)
        self._slots.columns, self._slots.width = positions, width
        hidden = self._forward(positions, {"input_ids" if inputs_embeds is None else "inputs_embeds": inputs})
        self.length += k
        self.read += k
        return hidden[:, -1] if single else hidden

    def rollback(self, discard: torch.Tensor) -> None:
        """Forget the newest ``discard[b]`` tokens of each row b (rejected drafts), per row.

        Only the row's length rewinds: its next token takes the first discarded position and column,
        and the discarded keys stay hidden (causally) until they are overwritten.
        """
        discard = torch.as_tensor(discard, dtype=torch.long, device=self.device)
        if bool((discard < 0).any()) or bool((discard > self.read).any()):
            raise ValueError(
                f"rollback discards {discard.tolist()} tokens, but the rows read {self.read.tolist()} since their "
                "restart; expected 0 <= discard <= what each row read"
            )
        self.length -= discard
        self.read -= discard

    def logits(self, decoder_states: torch.Tensor) -> torch.Tensor:
        """The LM head's logits ``[..., V]`` for final states (as the model's own forward)."""
        # .to: a model spread over devices (device_map) leaves its logits on its last one.
        return DECODER_ONLY.lm_head_logits(self.model, decoder_states).to(self.device)

    @property
    def clock(self) -> int:
        """The columns the next step attends before its own: the longest row (context + tokens read)."""
        return int(self.length.max())

    @property
    def capacity(self) -> int:
        """The columns each layer's key/value buffer holds now."""
        return self._slots.capacity

    # ------------------------------------------------------------------ internals
    def _forward(self, positions: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.body(
            **inputs,
            attention_mask=self._attention_mask(positions, self._slots.width),
            position_ids=positions,
            use_cache=True,
            **{self._cache_keyword: self.cache},
        )
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    def _attention_mask(self, positions: torch.Tensor, width: int) -> torch.Tensor | dict[str, torch.Tensor]:
        # Query at position q sees its own row's columns 0..q (columns are positions); sliding-window
        # layers only the last `window` of them. Additive: a float mask works for eager and SDPA alike.
        columns = torch.arange(width, device=self.device)[None, None, :]
        queries = positions[:, :, None]
        causal = columns <= queries
        minimum = torch.finfo(self._mask_dtype).min

        def additive(visible: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros(visible.shape, dtype=self._mask_dtype, device=self.device)
            return mask.masked_fill(~visible, minimum)[:, None]

        if self._window is None:
            return additive(causal)
        windowed = additive(causal & (columns > queries - self._window))
        if self._mask_types is None:
            return windowed
        return {"full_attention": additive(causal), "sliding_attention": windowed}

    def _reserve(self, columns: int) -> None:
        if columns > self._slots.capacity:
            # Room for a whole episode past the need, so that a step rarely grows the buffers.
            self._slots.capacity = columns + self.max_episode_len + 1

    def _compact(self) -> None:
        # Trim buffers that hold more than twice what the rows need (after a long context has gone).
        need = int(self.length.max()) + self.max_episode_len + 1
        if self._slots.capacity > 2 * need:
            self._slots.capacity = need
            for layer in self._layers:
                if layer.is_initialized:
                    layer.resize(need)


def is_causal_lm_config(config: PretrainedConfig | Any) -> bool:
    """Whether a config that is not encoder-decoder describes a causal (decoder-only) language model.

    transformers maps the model type to a causal-LM class; encoder models that also have one
    (BERT, RoBERTa, ...: those with a masked-LM head too) count only when configured as decoders.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    return model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(getattr(config, "is_decoder", False))


class DecoderOnlyFamily(ModelFamily):
    """Causal LMs (``AutoModelForCausalLM``): the prompt, then the output, in one sequence.

    The teacher reads C^(T) followed by X^(out) with nothing in between: a prompt format that wants
    a separator or a chat template puts it at the end of the prompt text. The incremental decoder is
    :class:`CausalIncrementalDecoder` (the prompt minus its last token prefilled once per episode,
    per-row positions, exact per-row rollback).
    """

    name = "decoder-only"

    def accepts(self, config: PretrainedConfig | Any) -> bool:
        return not getattr(config, "is_encoder_decoder", False) and is_causal_lm_config(config)

    def load(self, source: str, dtype: torch.dtype, **hub_kwargs: Any) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=False, use_safetensors=True, **hub_kwargs
        )
        check_supported_causal_lm(model)
        return model

    def default_prompt_format(self, tokenizer: PreTrainedTokenizerBase, chat_template: bool | None) -> PromptFormat:
        # An instruction-tuned model reads one user turn through its chat template; a base model "{prompt}\n".
        has_template = bool(getattr(tokenizer, "chat_template", None))
        return PromptFormat("chat" if has_template and chat_template is not False else "plain")

    def lm_head_logits(self, model: PreTrainedModel, decoder_states: torch.Tensor) -> torch.Tensor:
        # Applied as is, tied or not (check_supported_causal_lm refuses heads that scale or cap logits).
        logits: torch.Tensor = model.get_output_embeddings()(decoder_states)
        return logits

    def incremental_decoder(
        self, model: PreTrainedModel, batch_size: int, max_episode_len: int
    ) -> CausalIncrementalDecoder:
        return CausalIncrementalDecoder(model, batch_size, max_episode_len)

    def restart_inputs(
        self, model: PreTrainedModel, prompts: Sequence[Sequence[int]]
    ) -> tuple[list[list[int]], np.ndarray]:
        # The last prompt token is the first step's input, so that the step that reads it yields
        # p(x_1 | prompt) exactly as the encoder-decoder's start-token step does; the rest is prefilled.
        check_non_empty(prompts)
        return [list(p[:-1]) for p in prompts], np.array([int(p[-1]) for p in prompts], dtype=np.int64)

    def restart_batch(
        self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # As restart_inputs: the last real token of each row is its first step's input, the rest the context.
        lengths = check_non_empty_rows(attention_mask)
        first = input_ids.gather(1, (lengths - 1)[:, None]).squeeze(1).long()
        width = int(lengths.max()) - 1
        columns = torch.arange(width, device=input_ids.device)
        context_mask = (columns[None, :] < (lengths - 1)[:, None]).to(attention_mask.dtype)
        return input_ids[:, :width], context_mask, first

    def start_token_id(self, model: PreTrainedModel) -> int:
        raise TypeError(
            f"a decoder-only model ({model.config.model_type!r}) has no start token shared by every prompt: its first "
            "step reads the prompt's last token; use ModelFamily.restart_inputs(model, prompts)"
        )

    def generation_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # A causal model continues the end of its input, so generate wants the padding on the left.
        lengths = attention_mask.sum(dim=1)
        width = input_ids.shape[1]
        shift = (width - lengths)[:, None]
        columns = torch.arange(width, device=input_ids.device)[None, :]
        source = (columns - shift) % width  # rotate each row right by its padding
        return input_ids.gather(1, source), attention_mask.gather(1, source)

    def generated_tokens(self, sequences: torch.Tensor, prompt_width: int) -> torch.Tensor:
        # A causal model's generate returns its (left-padded) input followed by the new tokens.
        return sequences[:, prompt_width:]

    def teacher_forced_logits(
        self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor,
        forward: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        # One sequence per row: the prompt left-padded (so every output starts in the same column),
        # then the output. Positions count real tokens only, so a padded row reads exactly what it
        # would alone; the logits at columns L-1 … L+T-2 predict the T output tokens.
        left_ids, left_mask = self.generation_inputs(prompt_ids, prompt_mask)
        width, length = left_ids.shape[1], tokens.shape[1]
        input_ids = torch.cat([left_ids, tokens.to(left_ids.dtype)], dim=1)
        attention_mask = torch.cat([left_mask, torch.ones_like(tokens, dtype=left_mask.dtype)], dim=1)
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        logits = (forward or model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    logits_to_keep=length + 1).logits
        return logits[:, :length] if logits.shape[1] == length + 1 else logits[:, width - 1 : width - 1 + length]

    def next_token_logits(
        self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, output_ids: torch.Tensor
    ) -> torch.Tensor:
        # The left-padded prompt and the output so far in one sequence, positions counting real tokens.
        left_ids, left_mask = self.generation_inputs(prompt_ids, prompt_mask)
        sequence = torch.cat([left_ids, output_ids.to(left_ids.dtype)], dim=1)
        sequence_mask = torch.cat([left_mask, torch.ones_like(output_ids, dtype=left_mask.dtype)], dim=1)
        positions = (sequence_mask.cumsum(dim=1) - 1).clamp(min=0)
        logits: torch.Tensor = model(input_ids=sequence, attention_mask=sequence_mask, position_ids=positions,
                                     use_cache=False, logits_to_keep=1).logits
        return logits[:, -1]

    # ------------------------------------------------------------------ the policy's reads
    def read_prompt(
        self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, steps: int,
        encoded: torch.Tensor | None = None,
    ) -> PromptPass:
        # The teacher-forced pass runs the same incremental decoder as the rollout: a prefill here, then
        # the whole stream in one k-token step (read_stream). Each token is read once; right padding,
        # per-row positions (|Y_b|−1, |Y_b|, … for the stream of row b) and masks are those of the
        # incremental path by construction.
        if encoded is not None:
            raise TypeError("encoded (an encoder's output) applies to encoder-decoder policies; this policy is decoder-only")
        decoder = self.incremental_decoder(model, prompt_ids.shape[0], steps)
        states, mask, first = self.restart_rows(
            model, decoder, torch.arange(prompt_ids.shape[0], device=prompt_ids.device), prompt_ids, prompt_mask
        )
        return PromptPass(states, mask, first, decoder)

    def read_stream(
        self, model: PreTrainedModel, prompt: PromptPass, embeds: torch.Tensor, state_mask: torch.Tensor
    ) -> torch.Tensor:
        # Right padding of X^(in) needs no mask: a padded position comes after every real one of its row.
        if prompt.decoder is None:
            raise RuntimeError("a decoder-only prompt pass holds its incremental decoder")
        return prompt.decoder.step(inputs_embeds=embeds)

    def restart_rows(
        self, model: PreTrainedModel, decoder: IncrementalDecoding, rows: torch.Tensor, prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The prompt states are the prefill's final states (Y minus its last token). Why not the last
        # prompt token's state: that token is the stream's first, whose input the summary is added to,
        # so its state cannot feed the summary. A one-token prompt has no prefill: a mean of nothing, zero.
        context_ids, context_mask, first = self.restart_batch(model, prompt_ids, prompt_mask)
        states = decoder.restart(rows, context_ids, context_mask)
        if states is None:
            raise TypeError(f"{type(decoder).__name__} is not a causal LM's incremental decoder (its restart returns no states)")
        return states, context_mask.to(states.device), first.to(states.device)


DECODER_ONLY = DecoderOnlyFamily()
