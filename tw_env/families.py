"""The model-family seam: everything that depends on the models' architecture family, behind one interface.

A family knows how to load its models, how a prompt becomes model inputs, which token starts the
output, how to strip the prompt part from ``generate`` output, and how to build the incremental
decoder (KV cache, per-row restart, rollback) that the env and the decoders step. Everything
else (the env, the reward, the oracle, PCL, the decoders' control flow) is written once against it.

Two families:

- :class:`EncoderDecoderFamily` (T5): the encoder reads the prompt once, the decoder starts from
  ``decoder_start_token_id`` and attends to the encoder through cached cross-attention.
- :class:`DecoderOnlyFamily` (``AutoModelForCausalLM``: Llama, Qwen2, Qwen3, ...): the model reads
  its prompt and then the output in one sequence. The prompt minus its last token is prefilled into
  the KV cache once per episode; the prompt's last token plays the part of T5's start token (the
  model's first step reads it and yields p(x_1 | prompt)), then one token per step.

The two differ in what a restart reads and which token a row's first step reads:
:meth:`ModelFamily.restart_inputs` says both, so the env is written once for either.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel

from tw_env.causal_incremental import CausalIncrementalDecoder, check_supported_causal_lm
from tw_env.incremental import IncrementalDecoder
from tw_env.models import UnsupportedModelError


class IncrementalDecoding(Protocol):
    """The interface both incremental decoders share (:class:`~tw_env.incremental.IncrementalDecoder`
    for encoder-decoders, :class:`~tw_env.causal_incremental.CausalIncrementalDecoder` for causal LMs)."""

    batch_size: int
    device: torch.device

    def restart(
        self, rows: torch.Tensor | list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        """Begin new episodes in ``rows`` with what :meth:`ModelFamily.restart_inputs` gives as context.

        The causal decoder returns the contexts' final states (its prefill's); the encoder-decoder one
        returns None (it keeps its encoder states)."""

    def step(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Advance every row by one token (or k): the final states."""

    def rollback(self, discard: torch.Tensor) -> None:
        """Forget the newest ``discard[b]`` tokens of each row b."""

    def logits(self, decoder_states: torch.Tensor) -> torch.Tensor:
        """The LM head's logits for final states."""

    @property
    def clock(self) -> int:
        """The cache columns the next step attends before its own."""


class ModelFamily(ABC):
    """What the library needs to know about an architecture family (one instance per family)."""

    name: str

    @abstractmethod
    def load(self, source: str, dtype: torch.dtype, **hub_kwargs: Any) -> PreTrainedModel:
        """``from_pretrained`` with the family's auto class (safetensors only, no remote code)."""

    @abstractmethod
    def incremental_decoder(self, model: PreTrainedModel, batch_size: int, max_episode_len: int) -> IncrementalDecoding:
        """The per-row incremental decoding state the env, the decoders and the rollouts step.

        Both kinds share one interface (:class:`IncrementalDecoding`): ``restart(rows, input_ids,
        attention_mask)`` with what :meth:`restart_inputs` returns as context, ``step(input_ids=... |
        inputs_embeds=...)`` (one or k tokens per row), ``rollback(discard)``, ``logits(states)``, ``clock``.
        """

    @abstractmethod
    def restart_inputs(
        self, model: PreTrainedModel, prompts: Sequence[Sequence[int]]
    ) -> tuple[list[list[int]], np.ndarray]:
        """What an episode's restart reads of each prompt, and the token each row's first step reads.

        The incremental decoder's ``restart`` gets the first (right-padded by the caller), and its
        next ``step`` the second; that step's logits are p(x_1 | prompt). Raises on an empty prompt.
        """

    @abstractmethod
    def restart_batch(
        self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`restart_inputs` for a batch of right-padded prompt tensors ``[B, L]`` (the decoders and
        the policy): the contexts and their mask (right-padded, for ``restart``) and the first tokens ``[B]``."""

    @abstractmethod
    def start_token_id(self, model: PreTrainedModel) -> int:
        """The token the output X^(out) is conditioned on before its first token, where it is one
        token for every prompt (encoder-decoder models); see :meth:`restart_inputs` otherwise."""

    @abstractmethod
    def generation_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompts (``Task.prompts`` and friends) as ``generate`` wants them."""

    @abstractmethod
    def generated_tokens(self, sequences: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """The new tokens of a ``generate`` result (``[B, T]``), without what the model was fed."""

    @abstractmethod
    def teacher_forced_logits(
        self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor,
        forward: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """``[B, T, V]`` logits of ``model`` predicting each of ``tokens`` (``[B, T]``) from the right-padded
        prompts and the tokens before it: one teacher-forced forward (GKD's loss, a whole output at once).
        ``forward`` runs the model when it is not the model itself (a DDP wrapper)."""

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


class EncoderDecoderFamily(ModelFamily):
    """T5 and its relatives: encoder once per prompt, decoder from ``decoder_start_token_id``."""

    name = "encoder-decoder"

    def load(self, source: str, dtype: torch.dtype, **hub_kwargs: Any) -> PreTrainedModel:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=False, use_safetensors=True, **hub_kwargs
        )

    def incremental_decoder(self, model: PreTrainedModel, batch_size: int, max_episode_len: int) -> IncrementalDecoder:
        return IncrementalDecoder(model, batch_size, max_episode_len)

    def restart_inputs(
        self, model: PreTrainedModel, prompts: Sequence[Sequence[int]]
    ) -> tuple[list[list[int]], np.ndarray]:
        # The encoder reads the whole prompt; every row's decoder starts from decoder_start_token_id.
        _check_non_empty(prompts)
        return [list(p) for p in prompts], np.full(len(prompts), self.start_token_id(model), dtype=np.int64)

    def restart_batch(
        self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_non_empty_rows(attention_mask)
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


class DecoderOnlyFamily(ModelFamily):
    """Causal LMs (``AutoModelForCausalLM``): the prompt, then the output, in one sequence.

    The teacher reads C^(T) followed by X^(out) with nothing in between: a prompt format that wants
    a separator or a chat template puts it at the end of the prompt text. The incremental decoder is
    :class:`~tw_env.causal_incremental.CausalIncrementalDecoder` (the prompt minus its last token
    prefilled once per episode, per-row positions, exact per-row rollback).
    """

    name = "decoder-only"

    def load(self, source: str, dtype: torch.dtype, **hub_kwargs: Any) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=False, use_safetensors=True, **hub_kwargs
        )
        check_supported_causal_lm(model)
        return model

    def incremental_decoder(
        self, model: PreTrainedModel, batch_size: int, max_episode_len: int
    ) -> CausalIncrementalDecoder:
        return CausalIncrementalDecoder(model, batch_size, max_episode_len)

    def restart_inputs(
        self, model: PreTrainedModel, prompts: Sequence[Sequence[int]]
    ) -> tuple[list[list[int]], np.ndarray]:
        # The last prompt token is the first step's input, so that the step that reads it yields
        # p(x_1 | prompt) exactly as the encoder-decoder's start-token step does; the rest is prefilled.
        _check_non_empty(prompts)
        return [list(p[:-1]) for p in prompts], np.array([int(p[-1]) for p in prompts], dtype=np.int64)

    def restart_batch(
        self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # As restart_inputs: the last real token of each row is its first step's input, the rest the context.
        lengths = _check_non_empty_rows(attention_mask)
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


def _check_non_empty(prompts: Sequence[Sequence[int]]) -> None:
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty} are empty; expected at least one token per prompt")


def _check_non_empty_rows(attention_mask: torch.Tensor) -> torch.Tensor:
    """The prompts' lengths ``[B]``; raises on an empty prompt (a mask row of zeros)."""
    lengths = attention_mask.sum(dim=1).long()
    empty = torch.nonzero(lengths == 0).flatten().tolist()
    if empty:
        raise ValueError(f"prompts {empty} are empty; expected at least one token per prompt")
    return lengths


ENCODER_DECODER = EncoderDecoderFamily()
DECODER_ONLY = DecoderOnlyFamily()
FAMILIES: dict[str, ModelFamily] = {ENCODER_DECODER.name: ENCODER_DECODER, DECODER_ONLY.name: DECODER_ONLY}


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


def family_of(model_or_config: PreTrainedModel | PretrainedConfig | Any) -> ModelFamily:
    """The family of a model or config, read from its config.

    ``is_encoder_decoder`` means encoder-decoder; otherwise the config must be a causal LM's
    (:func:`is_causal_lm_config`), else a ValueError names the model type.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "is_encoder_decoder", False):
        return ENCODER_DECODER
    if is_causal_lm_config(config):
        return DECODER_ONLY
    model_type = getattr(config, "model_type", type(config).__name__)
    raise UnsupportedModelError(
        f"model type {model_type!r} is neither an encoder-decoder nor a causal (decoder-only) language model; "
        f"expected a teacher/student pair of one of the families {sorted(FAMILIES)}, e.g. FLAN-T5-XL with "
        "FLAN-T5-small, or two AutoModelForCausalLM models (Llama, Qwen2, Qwen3) that share a vocabulary"
    )


def check_same_family(teacher: PreTrainedModel | PretrainedConfig, student: PreTrainedModel | PretrainedConfig,
                      student_name: str = "student") -> ModelFamily:
    """Refuse a pair that mixes families: the env, the policy and the decoders assume one."""
    teacher_family, student_family = family_of(teacher), family_of(student)
    if teacher_family is not student_family:
        raise ValueError(
            f"the teacher is {teacher_family.name} but the {student_name} is {student_family.name}; expected "
            "a teacher and a student of one model family"
        )
    return teacher_family
