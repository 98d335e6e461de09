"""The model-family seam: everything that depends on the models being encoder-decoder, behind one interface.

A family knows how to load its models, how a prompt becomes model inputs, which token starts the
output, how to strip the prompt part from ``generate`` output, and how to build the incremental
decoder (KV cache, per-row restart, rollback) that the env and the decoders step. Everything
else (the env, the reward, the oracle, PCL, the decoders' control flow) is written once against it.

:class:`EncoderDecoderFamily` (T5) is the first implementation: the encoder reads the prompt once,
the decoder starts from ``decoder_start_token_id`` and attends to the encoder through cached
cross-attention. A decoder-only family (the prompt prefilled into the same cache, then one token
per step) is the second, added by the decoder-only issue.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from tw_env.incremental import IncrementalDecoder


class ModelFamily(ABC):
    """What the library needs to know about an architecture family (one instance per family)."""

    name: str

    @abstractmethod
    def load(self, source: str, dtype: torch.dtype, **hub_kwargs: Any) -> PreTrainedModel:
        """``from_pretrained`` with the family's auto class (safetensors only, no remote code)."""

    @abstractmethod
    def incremental_decoder(self, model: PreTrainedModel, batch_size: int, max_episode_len: int) -> IncrementalDecoder:
        """The per-row incremental decoding state the env, the decoders and the rollouts step."""

    @abstractmethod
    def start_token_id(self, model: PreTrainedModel) -> int:
        """The token the output X^(out) is conditioned on before its first token."""

    @abstractmethod
    def generated_tokens(self, sequences: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """The new tokens of a ``generate`` result (``[B, T]``), without what the model was fed."""

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

    def start_token_id(self, model: PreTrainedModel) -> int:
        return int(model.config.decoder_start_token_id)

    def generated_tokens(self, sequences: torch.Tensor, prompt_width: int) -> torch.Tensor:
        # An encoder-decoder's generate returns the decoder sequence: the start token, then the output.
        return sequences[:, 1:]


ENCODER_DECODER = EncoderDecoderFamily()
FAMILIES: dict[str, ModelFamily] = {ENCODER_DECODER.name: ENCODER_DECODER}


def family_of(model_or_config: PreTrainedModel | PretrainedConfig | Any) -> ModelFamily:
    """The family of a model or config, read from its config (``is_encoder_decoder``)."""
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "is_encoder_decoder", False):
        return ENCODER_DECODER
    model_type = getattr(config, "model_type", type(config).__name__)
    raise ValueError(
        f"model type {model_type!r} is decoder-only; this version supports encoder-decoder teacher/student "
        f"pairs (families: {sorted(FAMILIES)}), e.g. FLAN-T5-XL with FLAN-T5-small"
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
