"""The registry of model families: which family a model is, and a check that a pair shares one.

A family is one :class:`~tw_env.model_family.ModelFamily` subclass and its incremental decoder, in
one file; everything that depends on the architecture is a method of the family (loading, the
default prompt format, the LM head, restarts and the cache, ``generate``'s inputs, the policy's
reads). The env, the reward, the oracle, PCL, the policy and the decoders are written once against it.

Two families, asked in this order:

- :class:`~tw_env.incremental.EncoderDecoderFamily` (T5, ``tw_env/incremental.py``): the encoder
  reads the prompt once, the decoder starts from ``decoder_start_token_id`` and attends to the
  encoder through cached cross-attention.
- :class:`~tw_env.causal_incremental.DecoderOnlyFamily` (``AutoModelForCausalLM``: Llama, Qwen2,
  Qwen3, ...; ``tw_env/causal_incremental.py``): the model reads its prompt and then the output in
  one sequence. The prompt minus its last token is prefilled into the KV cache once per episode; the
  prompt's last token plays the part of T5's start token.

Adding a family: write its class and decoder in one file, and add its instance to ``FAMILIES``.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, PreTrainedModel

from tw_env.causal_incremental import DECODER_ONLY, DecoderOnlyFamily, is_causal_lm_config
from tw_env.incremental import ENCODER_DECODER, EncoderDecoderFamily
from tw_env.model_family import IncrementalDecoding, ModelFamily, PromptPass, UnsupportedModelError

__all__ = [
    "DECODER_ONLY",
    "ENCODER_DECODER",
    "FAMILIES",
    "DecoderOnlyFamily",
    "EncoderDecoderFamily",
    "IncrementalDecoding",
    "ModelFamily",
    "PromptPass",
    "UnsupportedModelError",
    "check_same_family",
    "family_of",
    "is_causal_lm_config",
]

# Every family, by name, in the order family_of asks them (the first that accepts a config is its family).
FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (ENCODER_DECODER, DECODER_ONLY)}


def family_of(model_or_config: PreTrainedModel | PretrainedConfig | Any) -> ModelFamily:
    """The family of a model or config, read from its config: the first of :data:`FAMILIES` that accepts it
    (``is_encoder_decoder``: encoder-decoder; else a causal LM's model type: decoder-only), else an
    :class:`~tw_env.model_family.UnsupportedModelError` that names the model type.
    """
    config = getattr(model_or_config, "config", model_or_config)
    for family in FAMILIES.values():
        if family.accepts(config):
            return family
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
