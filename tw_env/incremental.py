"""The encoder-decoder family (T5): :class:`EncoderDecoderFamily` and its incremental decoder, in which
each row of a batch restarts on its own.

Why this exists: the environment steps N episodes in lock step, with one decoder forward per step,
and episodes end at different times (autoreset). Re-running a prefix is never allowed, so each row
keeps its KV cache, and a row that starts a new episode must not disturb the others.

How: all rows share one clock (the cache length). A row that restarts gets its encoder run once
and its cross-attention keys/values written in place, and its earlier self-attention positions are
masked out. T5's relative position bias depends only on the distance between query and key, so a
new episode that begins at clock s sees exactly the distances it would see from position 0.
When the shared cache grows past twice the longest episode, the columns no live row can see are
dropped (the same amount for every row, so distances are unchanged).

The family (:data:`ENCODER_DECODER`): the encoder reads the whole prompt once per episode; the decoder
starts every row from ``decoder_start_token_id`` and reads X^(out) (the env's teacher) or the policy's
X^(in) stream with cross-attention to the encoder states, which are also the prompt states the
policy's prompt summary reads. A tied LM head rescales the decoder output by d_model^-0.5.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from tw_env.model_family import (
    IncrementalDecoding,
    ModelFamily,
    PromptPass,
    cache_keyword,
    check_non_empty,
    check_non_empty_rows,
)
from tw_env.prompts import TEXT_FORMAT, PromptFormat


class _KVLayer(Protocol):
    """A cache layer's key and value tensors (``[B, heads, T, d]``)."""

    keys: torch.Tensor
    values: torch.Tensor


def _kv_layers(layers: Iterable[object]) -> list[_KVLayer]:
    # transformers types a layer's keys/values as Optional (unset before its first forward); every
    # layer read here has been written by a forward already (cross-attention: is_updated).
    return cast("list[_KVLayer]", list(layers))


class IncrementalDecoder:
    """Incremental decoding state for ``batch_size`` rows of one seq2seq model.

    Call :meth:`restart` for rows that begin a new source, then :meth:`step` once per token with
    one input per row (token ids or embeddings). The caller chooses ``torch.no_grad()``.
    """

    def __init__(self, model: PreTrainedModel, batch_size: int, max_episode_len: int) -> None:
        self.model = model
        self.batch_size = batch_size
        self.max_episode_len = max_episode_len
        self.device = model.device
        self.decoder_start_token_id = model.config.decoder_start_token_id
        self.encoder_states: torch.Tensor | None = None  # [B, L, d]
        self.encoder_mask: torch.Tensor | None = None  # [B, L]
        self.self_mask = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)  # [B, clock]
        self.start = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # episode start per row
        self.cache: EncoderDecoderCache | None = None
        self._cache_keyword = cache_keyword(model.get_decoder())

    # ------------------------------------------------------------------ restarts
    def restart(self, rows: torch.Tensor | list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Begin new episodes in ``rows`` with encoder inputs ``input_ids`` ([len(rows), L])."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        encoded = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.encoder_states is None or self.encoder_mask is None:
            if len(rows) != self.batch_size:
                raise ValueError(f"the first restart must cover all {self.batch_size} rows, got {len(rows)}")
            order = torch.argsort(rows)
            self.encoder_states, self.encoder_mask = encoded[order], attention_mask[order]
            self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            return
        length = encoded.shape[1]
        encoder_states, encoder_mask = self._fit_encoder_length(self.encoder_states, self.encoder_mask, length)
        encoder_states[rows] = 0
        encoder_states[rows, :length] = encoded
        encoder_mask[rows] = 0
        encoder_mask[rows, :length] = attention_mask
        self._write_cross_attention(rows, encoder_states[rows])
        self.self_mask[rows] = 0
        self.start[rows] = self.self_mask.shape[1]

    def _fit_encoder_length(
        self, encoder_states: torch.Tensor, encoder_mask: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Pads the stored encoder states, mask and cross-attention cache to ``length``; returns the two.
        pad = length - encoder_states.shape[1]
        if pad <= 0:
            return encoder_states, encoder_mask
        self.encoder_states = encoder_states = F.pad(encoder_states, (0, 0, 0, pad))
        self.encoder_mask = encoder_mask = F.pad(encoder_mask, (0, pad))
        for layer in self._cross_layers():
            layer.keys = F.pad(layer.keys, (0, 0, 0, pad))
            layer.values = F.pad(layer.values, (0, 0, 0, pad))
        return encoder_states, encoder_mask

    def _live_cache(self) -> EncoderDecoderCache:
        if self.cache is None:
            raise RuntimeError("restart() must be called for every row before the cache is used")
        return self.cache

    def _cross_layers(self) -> list[_KVLayer]:
        cache = self._live_cache()
        cross = cache.cross_attention_cache
        return _kv_layers(layer for i, layer in enumerate(cross.layers) if cache.is_updated.get(i))

    def _write_cross_attention(self, rows: torch.Tensor, encoded: torch.Tensor) -> None:
        # The same projections T5Attention applies to the encoder output on its first call.
        cache = self._live_cache()
        for i, layer in enumerate(_kv_layers(cache.cross_attention_cache.layers)):
            if not cache.is_updated.get(i):
                continue  # not computed yet: the next forward computes it for every row
            attention = self.model.get_decoder().block[i].layer[1].EncDecAttention
            shape = (*encoded.shape[:-1], -1, attention.key_value_proj_dim)
            layer.keys[rows] = attention.k(encoded).view(shape).transpose(1, 2).to(layer.keys.dtype)
            layer.values[rows] = attention.v(encoded).view(shape).transpose(1, 2).to(layer.values.dtype)

    # ------------------------------------------------------------------ steps
    def step(
        self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Advance every row by one token (``[B]`` ids or ``[B, d]`` embeddings): final states ``[B, d]``.

        Inputs with an extra time axis (``[B, k]`` ids or ``[B, k, d]`` embeddings) advance every row
        by k tokens in one forward, as a verifier or a catching-up teacher does; then ``[B, k, d]``.
        """
        if self.encoder_states is None:
            raise RuntimeError("restart() must be called for every row before step()")
        inputs = input_ids if inputs_embeds is None else inputs_embeds
        if inputs is None:
            raise TypeError("step() needs input_ids or inputs_embeds")
        single = inputs.dim() == (1 if inputs_embeds is None else 2)  # no time axis
        kwargs = {"input_ids" if inputs_embeds is None else "inputs_embeds": inputs[:, None] if single else inputs}
        width = 1 if single else inputs.shape[1]
        self.self_mask = F.pad(self.self_mask, (0, width), value=1)
        out = self.model.get_decoder()(
            **kwargs,
            attention_mask=self.self_mask,
            encoder_hidden_states=self.encoder_states,
            encoder_attention_mask=self.encoder_mask,
            use_cache=True,
            **{self._cache_keyword: self.cache},
        )
        self._compact()
        return out.last_hidden_state[:, -1] if single else out.last_hidden_state

    def rollback(self, discard: torch.Tensor) -> None:
        """Forget the newest ``discard[b]`` tokens of each row b (rejected drafts), per row.

        T5's keys and values carry no position (the bias is relative and added at attention time),
        so a row's cache can be rotated: its kept tokens move right to end at the newest column and
        the discarded ones wrap round to the left, where they are masked. Every row then stays
        contiguous, so distances, and hence outputs, are exactly those of a row that never drafted.
        """
        discard = torch.as_tensor(discard, dtype=torch.long, device=self.device)
        if int(discard.max()) == 0:
            return
        clock = self.clock
        columns = torch.arange(clock, device=self.device)
        source = (columns[None, :] - discard[:, None]) % clock  # [B, clock]: where each column comes from
        for layer in _kv_layers(self._live_cache().self_attention_cache.layers):
            index = source[:, None, :, None].expand_as(layer.keys)
            layer.keys = layer.keys.gather(2, index)
            layer.values = layer.values.gather(2, index)
        self.self_mask = self.self_mask.gather(1, source)
        self.self_mask[columns[None, :] < discard[:, None]] = 0
        self.start = self.start + discard

    def logits(self, decoder_states: torch.Tensor) -> torch.Tensor:
        """The LM head's logits ``[..., V]`` for final decoder states (as the model's own forward)."""
        # .to: a teacher spread over devices (device_map) leaves its logits on its last one.
        return ENCODER_DECODER.lm_head_logits(self.model, decoder_states).to(self.device)

    def _compact(self) -> None:
        if self.self_mask.shape[1] <= 2 * self.max_episode_len + 1:
            return
        drop = int(self.start.min())
        if drop <= 0:
            return
        for layer in _kv_layers(self._live_cache().self_attention_cache.layers):
            layer.keys = layer.keys[:, :, drop:]
            layer.values = layer.values[:, :, drop:]
        self.self_mask = self.self_mask[:, drop:]
        self.start -= drop

    @property
    def clock(self) -> int:
        """The shared cache length: columns every row's self-attention mask spans."""
        return self.self_mask.shape[1]


def encoder_outputs(decoder: IncrementalDecoding) -> tuple[torch.Tensor, torch.Tensor]:
    """An encoder-decoder's incremental decoder's encoder states ``[B, L, d]`` and mask ``[B, L]`` (set by
    its first ``restart``). A causal LM's decoder has none: its ``restart`` returns its context's states."""
    if not isinstance(decoder, IncrementalDecoder):
        raise TypeError(
            f"encoder_outputs reads an encoder-decoder's IncrementalDecoder, got {type(decoder).__name__}; a causal "
            "LM has no encoder (its decoder's restart returns the prompt states)"
        )
    if decoder.encoder_states is None or decoder.encoder_mask is None:
        raise RuntimeError("the decoder has no encoder states yet: restart() every row before reading them")
    return decoder.encoder_states, decoder.encoder_mask


class EncoderDecoderFamily(ModelFamily):
    """T5 and its relatives: encoder once per prompt, decoder from ``decoder_start_token_id``."""

    name = "encoder-decoder"

    def accepts(self, config: PretrainedConfig | Any) -> bool:
        return bool(getattr(config, "is_encoder_decoder", False))

    def load(self, source: str, dtype: torch.dtype, **hub_kwargs: Any) -> PreTrainedModel:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=False, use_safetensors=True, **hub_kwargs
        )

    def default_prompt_format(self, tokenizer: PreTrainedTokenizerBase, chat_template: bool | None) -> PromptFormat:
        if chat_template:
            raise ValueError("chat_template=True applies to decoder-only pairs; an encoder-decoder reads its prompt as text")
        return TEXT_FORMAT

    def lm_head_logits(self, model: PreTrainedModel, decoder_states: torch.Tensor) -> torch.Tensor:
        # T5 with tied embeddings rescales the decoder output by d_model^-0.5 before the head.
        scale = getattr(model.config, "scale_decoder_outputs", None)
        if scale is None:
            scale = getattr(model.config, "tie_word_embeddings", False)  # transformers 4.x names it after weight tying
        if scale:
            decoder_states = decoder_states * (model.config.d_model**-0.5)
        return model.get_output_embeddings()(decoder_states)

    def incremental_decoder(self, model: PreTrainedModel, batch_size: int, max_episode_len: int) -> IncrementalDecoder:
        return IncrementalDecoder(model, batch_size, max_episode_len)

    def restart_inputs(
        self, model: PreTrainedModel, prompts: Sequence[Sequence[int]]
    ) -> tuple[list[list[int]], np.ndarray]:
        # The encoder reads the whole prompt; every row's decoder starts from decoder_start_token_id.
        check_non_empty(prompts)
        return [list(p) for p in prompts], np.full(len(prompts), self.start_token_id(model), dtype=np.int64)

    def restart_batch(
        self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_non_empty_rows(attention_mask)
        first = torch.full((input_ids.shape[0],), self.start_token_id(model), dtype=torch.long, device=input_ids.device)
        return input_ids, attention_mask, first

    def start_token_id(self, model: PreTrainedModel) -> int:
        return int(model.config.decoder_start_token_id)

    def generation_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return input_ids, attention_mask  # the encoder reads right padding through its mask

    def generated_tokens(self, sequences: torch.Tensor, prompt_width: int) -> torch.Tensor:
        # An encoder-decoder's generate returns the decoder sequence: the start token, then the output.
        return sequences[:, 1:]

    def teacher_forced_logits(
        self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor,
        forward: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        # The decoder reads the start token, then every output token but the last.
        start = torch.full_like(tokens[:, :1], self.start_token_id(model))
        decoder_input_ids = torch.cat([start, tokens[:, :-1]], dim=1)
        return (forward or model)(input_ids=prompt_ids, attention_mask=prompt_mask,
                                  decoder_input_ids=decoder_input_ids).logits

    def next_token_logits(
        self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, output_ids: torch.Tensor
    ) -> torch.Tensor:
        # The encoder on the prompt, the decoder on the start token and the output so far.
        start = torch.full((output_ids.shape[0], 1), self.start_token_id(model), dtype=torch.long,
                           device=output_ids.device)
        decoder_input_ids = torch.cat([start, output_ids], dim=1)
        logits: torch.Tensor = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                                     decoder_input_ids=decoder_input_ids, use_cache=False).logits
        return logits[:, -1]

    # ------------------------------------------------------------------ the policy's reads
    def encode(self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        states: torch.Tensor = model.get_encoder()(input_ids=prompt_ids, attention_mask=prompt_mask).last_hidden_state
        return states

    def read_prompt(
        self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, steps: int,
        encoded: torch.Tensor | None = None,
    ) -> PromptPass:
        # The encoder reads Y; its states are the prompt states.
        if encoded is None:
            encoded = self.encode(model, prompt_ids, prompt_mask)
        first = torch.full_like(prompt_ids[:, 0], self.start_token_id(model))
        return PromptPass(encoded, prompt_mask, first)

    def read_stream(
        self, model: PreTrainedModel, prompt: PromptPass, embeds: torch.Tensor, state_mask: torch.Tensor
    ) -> torch.Tensor:
        # The decoder reads the stream with cross-attention to the encoder states.
        mask = torch.cat([torch.ones_like(state_mask[:, :1]), state_mask], dim=1).long()
        out = model.get_decoder()(
            inputs_embeds=embeds, attention_mask=mask, encoder_hidden_states=prompt.states,
            encoder_attention_mask=prompt.mask, use_cache=False,
        )
        states: torch.Tensor = out.last_hidden_state
        return states

    def restart_rows(
        self, model: PreTrainedModel, decoder: IncrementalDecoding, rows: torch.Tensor, prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        decoder.restart(rows, prompt_ids, prompt_mask)
        encoder_states, encoder_mask = encoder_outputs(decoder)
        first = torch.full_like(rows, self.start_token_id(model))
        return encoder_states[rows], encoder_mask[rows], first


ENCODER_DECODER = EncoderDecoderFamily()
