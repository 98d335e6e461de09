"""What a model family is: the interface every family implements, and what the families share.

A model family is one :class:`ModelFamily` subclass and one incremental decoder, in one file
(``tw_env/incremental.py``: T5; ``tw_env/causal_incremental.py``: causal LMs), registered in
:mod:`tw_env.families`. The family object owns everything that depends on the architecture: which
configs it takes, how to load a model, the prompt format a task gets by default, how the LM head
reads final states, what a restart reads of a prompt and which token a row's first step reads,
the incremental decoder (its cache layout), how ``generate`` wants its inputs, and how the student
policy reads a prompt and then X^(in). The rest of the library asks the family; it never tests
which family it has.

This module imports no other module of the library but :mod:`tw_env.prompts`, so that the family
files (and :mod:`tw_env.models`, which loads through the families) sit above it without a circle.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from tw_env.prompts import PromptFormat


class UnsupportedModelError(ValueError):
    """A model (or config) the library cannot run exactly: the wrong family, or an unsupported variant."""


class IncrementalDecoding(Protocol):
    """The interface every family's incremental decoder implements (:class:`~tw_env.incremental.IncrementalDecoder`
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


@dataclass
class PromptPass:
    """What a teacher-forced pass of the policy keeps of the prompt between reading it and reading X^(in)
    (:meth:`ModelFamily.read_prompt`, then :meth:`ModelFamily.read_stream`)."""

    states: torch.Tensor  # [B, L, d]: the prompt states the policy's prompt summary is the mean of
    mask: torch.Tensor  # [B, L]: which of them are real tokens
    first: torch.Tensor  # [B]: the token the X^(in) stream reads first (before x_1)
    decoder: IncrementalDecoding | None = None  # where the family reads the stream through an incremental decoder


class ModelFamily(ABC):
    """What the library needs to know about an architecture family (one instance per family).

    The policy's X^(in) stream is ``[first ; x_1 … x_T]``, ``first`` being the token
    :meth:`restart_inputs` says a row's first step reads; the state after stream token i gives π
    for action i+1. :meth:`read_prompt` and :meth:`read_stream` are its teacher-forced pass,
    :meth:`restart_rows` starts it in an incremental decoder.
    """

    name: str

    # ------------------------------------------------------------------ which models, how loaded
    @abstractmethod
    def accepts(self, config: PretrainedConfig | Any) -> bool:
        """Whether a model config belongs to this family (:func:`~tw_env.families.family_of` asks each
        registered family in order)."""

    @abstractmethod
    def load(self, source: str, dtype: torch.dtype, **hub_kwargs: Any) -> PreTrainedModel:
        """``from_pretrained`` with the family's auto class (safetensors only, no remote code)."""

    @abstractmethod
    def default_prompt_format(self, tokenizer: PreTrainedTokenizerBase, chat_template: bool | None) -> PromptFormat:
        """The prompt format of a task whose caller named none (:func:`~tw_env.prompts.resolve_prompt_format`);
        ``chat_template`` is the caller's switch (None: the family's choice)."""

    @abstractmethod
    def lm_head_logits(self, model: PreTrainedModel, decoder_states: torch.Tensor) -> torch.Tensor:
        """The LM head applied to final states exactly as the model's own forward applies it."""

    # ------------------------------------------------------------------ incremental decoding
    @abstractmethod
    def incremental_decoder(self, model: PreTrainedModel, batch_size: int, max_episode_len: int) -> IncrementalDecoding:
        """The per-row incremental decoding state the env, the decoders and the rollouts step.

        Every family's has one interface (:class:`IncrementalDecoding`): ``restart(rows, input_ids,
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

    # ------------------------------------------------------------------ generate and full forwards
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

    @abstractmethod
    def next_token_logits(
        self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, output_ids: torch.Tensor
    ) -> torch.Tensor:
        """``[B, V]`` logits of the token after the right-padded prompts and ``output_ids`` ``[B, t]`` (t ≥ 0),
        from one full forward without a cache: a reference that reads everything again at every step."""

    # ------------------------------------------------------------------ the policy's reads
    def encode(self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """The encoder states ``[B, L, d]`` of right-padded prompts, for a family whose models have an encoder."""
        raise TypeError(
            f"encode() runs an encoder; a {self.name} model has none (a policy reads its prompt with "
            "state_features or decoder_states)"
        )

    @abstractmethod
    def read_prompt(
        self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, steps: int,
        encoded: torch.Tensor | None = None,
    ) -> PromptPass:
        """Read right-padded prompts ``[B, L]`` for a teacher-forced pass over ``steps`` stream tokens
        (``encoded``: :meth:`encode`'s output when the caller has it already)."""

    @abstractmethod
    def read_stream(
        self, model: PreTrainedModel, prompt: PromptPass, embeds: torch.Tensor, state_mask: torch.Tensor
    ) -> torch.Tensor:
        """Final states ``[B, T+1, d]`` of the embedded stream ``embeds`` ``[B, T+1, d]`` after
        :meth:`read_prompt` (``state_mask`` ``[B, T]``: the real tokens of X^(in))."""

    @abstractmethod
    def restart_rows(
        self, model: PreTrainedModel, decoder: IncrementalDecoding, rows: torch.Tensor, prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Begin episodes in ``rows`` of an incremental decoder of ``model`` with right-padded prompts: their
        prompt states ``[R, L, d]`` (what the policy's prompt summary reads), their mask and first tokens ``[R]``."""

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


def check_non_empty(prompts: Sequence[Sequence[int]]) -> None:
    """Raise on an empty prompt: every family's first step reads something of it."""
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty} are empty; expected at least one token per prompt")


def check_non_empty_rows(attention_mask: torch.Tensor) -> torch.Tensor:
    """The prompts' lengths ``[B]``; raises on an empty prompt (a mask row of zeros)."""
    lengths = attention_mask.sum(dim=1).long()
    empty = torch.nonzero(lengths == 0).flatten().tolist()
    if empty:
        raise ValueError(f"prompts {empty} are empty; expected at least one token per prompt")
    return lengths


@cache
def _cache_keyword_of(forward_signature: inspect.Signature) -> str:
    return "cache" if "cache" in forward_signature.parameters else "past_key_values"


def cache_keyword(module: torch.nn.Module) -> str:
    """The name under which ``module.forward`` takes a KV cache: ``cache`` or ``past_key_values``.

    transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns and goes in 5.40);
    the oldest release we support only knows the old one. Reading the signature keeps our calls on
    the current name without a version table.
    """
    return _cache_keyword_of(inspect.signature(module.forward))
