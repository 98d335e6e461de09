"""A tiny, download-free Training Wheels task for tests: the synthetic language's real word-level
tokenizer, two tiny random models (teacher and student: T5s, or causal LMs with
:func:`make_tiny_causal_task`) and a few hundred examples on disk; and :class:`TinyFamily`, one per
model family, which the ``family`` fixture hands to the tests written once for both families."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutput

from tw_env.causal_incremental import CausalIncrementalDecoder
from tw_env.incremental import IncrementalDecoder
from tw_env.synthetic import SyntheticLanguage, build_tokenizer, padded_vocab_size

EOS = 1  # the synthetic tokenizer's EOS id, which every tiny test model uses


@dataclass
class TinyTask:
    teacher_dir: Path
    student_dir: Path
    tokenizer_dir: Path
    train_file: Path
    validation_file: Path

    def env_kwargs(self) -> dict:
        """gym.make overrides: with all four given, the synthetic task trains nothing; ``split`` picks the file."""
        return {
            "teacher": str(self.teacher_dir), "student": str(self.student_dir),
            "tokenizer": str(self.tokenizer_dir), "data": str(self.train_file.parent),
        }


def tiny_t5(vocab_size: int, d_model: int, layers: int, seed: int) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers,
        num_decoder_layers=layers, num_heads=max(d_model // 8, 1), decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_causal_lm(
    vocab_size: int, hidden: int, layers: int, seed: int, arch: str = "llama", tied: bool = False,
    initializer_range: float = 0.02, **config: object,
) -> PreTrainedModel:
    """A random decoder-only LM (``"llama"``, ``"qwen2"`` or ``"qwen3"``) with the synthetic tokenizer's ids
    (pad 0, EOS 1); extra keywords go to its config (e.g. a Qwen2 sliding window)."""
    torch.manual_seed(seed)
    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }[arch]
    model_config = config_class(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 8, 1), num_key_value_heads=max(hidden // 16, 1), head_dim=8,
        max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=tied,
        initializer_range=initializer_range, **config,
    )
    return model_class(model_config).eval()


def make_tiny_task(root: Path, n_train: int = 200, n_validation: int = 40) -> TinyTask:
    """The tiny task with two T5s."""
    return FAMILIES["encoder-decoder"].task(root, n_train, n_validation)


def make_tiny_causal_task(root: Path, n_train: int = 200, n_validation: int = 40) -> TinyTask:
    """The tiny task with a decoder-only pair sharing the vocabulary: a Llama teacher (untied head) and
    a smaller Qwen2 student (tied embeddings)."""
    return FAMILIES["decoder-only"].task(root, n_train, n_validation)


def _tiny_language() -> SyntheticLanguage:
    return SyntheticLanguage(seed=0, n_words=60, n_target_words=60)


def _tiny_vocab() -> int:
    return padded_vocab_size(build_tokenizer(_tiny_language()))


def _write_task(root: Path, teacher: PreTrainedModel, student: PreTrainedModel, n_train: int, n_validation: int) -> TinyTask:
    language = _tiny_language()
    tokenizer = build_tokenizer(language)
    task = TinyTask(root / "teacher", root / "student", root / "tokenizer", root / "train.jsonl", root / "validation.jsonl")
    tokenizer.save_pretrained(task.tokenizer_dir)
    teacher.save_pretrained(task.teacher_dir)
    student.save_pretrained(task.student_dir)
    for path, n, seed in ((task.train_file, n_train, 1), (task.validation_file, n_validation, 2)):
        path.write_text("".join(json.dumps(row) + "\n" for row in language.sample(n, seed)))
    return task


def make_eager_to_end_student(student_dir: Path, target: Path, eos_token_id: int = 1) -> Path:
    """A copy of a tiny student whose EOS probability swings with its decoder state, so that sampled
    episodes end after 1, 3, 7 or 12 tokens: rows of one batch end at different times.

    The final layer norm keeps one dimension h₀ (sign and size vary with the context) and the LM
    head reads only that dimension, into the EOS logit alone: π(EOS) ≈ 1 where −6·h₀ is large,
    and every other token is equally likely.
    """
    model = T5ForConditionalGeneration.from_pretrained(student_dir)
    with torch.no_grad():
        norm = model.decoder.final_layer_norm.weight
        norm.zero_()
        norm[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos_token_id, 0] = -6.0
    model.save_pretrained(target)
    return Path(target)


def make_eager_to_end_causal_student(student_dir: Path, target: Path, eos_token_id: int = 1) -> Path:
    """A causal student (an untied Qwen2 like the tiny task's) whose EOS probability swings with its
    state, as :func:`make_eager_to_end_student` does for T5: the final norm keeps one dimension h₀ and
    the LM head reads only that one, into EOS alone."""
    tied = Qwen2ForCausalLM.from_pretrained(student_dir)
    config = tied.config
    config.tie_word_embeddings = False
    model = Qwen2ForCausalLM(config).eval()
    model.load_state_dict(tied.state_dict(), strict=False)  # the embeddings; the head is rewritten below
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos_token_id, 0] = -6.0
    model.save_pretrained(target)
    return Path(target)


# ------------------------------------------------------------------------------------- the two families
@dataclass(frozen=True, repr=False)
class TinyFamily(ABC):
    """One model family as the tests build and check it: its tiny models (built from configs), the tiny
    task, and the full (no-cache) forwards that serve as independent references for the library's
    incremental decoders, env and policy. The ``family`` fixture (tests/conftest.py) gives one per
    family; a test that takes it runs once for each, with the ids ``[encoder-decoder]`` and ``[decoder-only]``.
    """

    name: str
    auto_class: type  # the transformers Auto class that loads a saved student without <τ>
    decoder_class: type  # the library's incremental decoder of this family (what the references check)
    # (student directory, target) -> a copy of the tiny task's student whose sampled episodes of one
    # batch end at different times
    eager_to_end_student: Callable[[Path, Path], Path]
    prompt_ends_with_eos: bool  # T5 prompts end in EOS (as a T5 tokenizer's do); a causal LM continues its prompt

    def __repr__(self) -> str:
        return self.name

    @abstractmethod
    def teacher_lm(self, vocab_size: int, seed: int) -> PreTrainedModel:
        """The tiny task's teacher."""

    @abstractmethod
    def student_lm(self, vocab_size: int, seed: int) -> PreTrainedModel:
        """The tiny task's student, smaller than the teacher."""

    def task(self, root: Path, n_train: int = 200, n_validation: int = 40) -> TinyTask:
        vocab = _tiny_vocab()
        return _write_task(Path(root), self.teacher_lm(vocab, seed=1), self.student_lm(vocab, seed=2), n_train, n_validation)

    def incremental_decoder(self, model: PreTrainedModel, batch_size: int, max_episode_len: int):
        return self.decoder_class(model, batch_size, max_episode_len)

    @abstractmethod
    def reference_logits(self, model: PreTrainedModel, context: list[int], inputs: list[int]) -> torch.Tensor:
        """``[len(inputs), V]``: the logits after each of ``inputs``, read after ``context`` (T5: the
        encoder's prompt; a causal LM: the tokens before), from one forward without any cache."""

    @abstractmethod
    def stream_start(self, model: PreTrainedModel, prompt: list[int]) -> tuple[list[int], int]:
        """(context, first): what precedes the output stream, and the token the stream reads first
        (T5: the whole prompt and the decoder start token; a causal LM: the prompt but its last token, and that one)."""

    def output_logits(self, model: PreTrainedModel, prompt: list[int], outputs: list[int]) -> torch.Tensor:
        """``[len(outputs), V]``: entry p the logits of output token p given the prompt and ``outputs[:p]``."""
        context, first = self.stream_start(model, prompt)
        return self.reference_logits(model, context, [first, *outputs[:-1]])

    def next_logits(self, model: PreTrainedModel, prompt: list[int], outputs: list[int]) -> torch.Tensor:
        """``[V]``: the logits of the token after ``outputs``."""
        return self.output_logits(model, prompt, [*outputs, 0])[-1]

    @torch.no_grad()
    def greedy(self, model: PreTrainedModel, prompt: list[int], max_new_tokens: int, eos: int = 1) -> list[int]:
        """Greedy decoding of one unpadded prompt by one full forward per token (up to EOS or max_new_tokens)."""
        out: list[int] = []
        while len(out) < max_new_tokens and (not out or out[-1] != eos):
            out.append(int(self.next_logits(model, prompt, out).argmax()))
        return out

    @abstractmethod
    def _prompt_states(self, model: PreTrainedModel, context: list[int]) -> torch.Tensor:
        """``[len(context), d]``: the prompt states whose mean the policy's prompt summary reads."""

    @abstractmethod
    def _stream(self, model: PreTrainedModel, context: list[int], embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(final states ``[T, d]``, token logits ``[T, V]``) of the embedded stream ``[T, d]`` after ``context``."""

    def policy_logits(self, policy, prompt: list[int], x_in: list[int]) -> torch.Tensor:
        """π's logits ``[T, V+1]`` for one episode by plain full forwards of the LM (no cache, no padding).

        The stream is ``[first ; x_1 … x_{T-1}]`` with Eq. 15's β on teacher tokens (ids ≥ V) and the
        prompt summary (a projection of the mean prompt state) added to every input; the <τ> logit is
        the sum of its three reads (the final state, the confidence of π_V, the mean prompt state).
        """
        model, vocab = policy.model, policy.vocab_size
        embed = model.get_input_embeddings()
        context, first = self.stream_start(model, prompt)
        prompt_states = self._prompt_states(model, context)
        mean = prompt_states.mean(0) if len(context) else torch.zeros(model.config.hidden_size)
        summary = mean @ policy.prompt_summary.weight.T
        stream = torch.tensor([first, *x_in[:-1]])
        embeds = embed(stream % vocab) + (stream >= vocab).float()[:, None] * policy.state_embedding.beta + summary
        states, token_logits = self._stream(model, context, embeds)
        log_pi_v = torch.log_softmax(token_logits.detach(), dim=-1)  # the confidence read is not trained through the LM
        confidence = torch.stack([log_pi_v.max(-1).values, -(log_pi_v.exp() * log_pi_v).sum(-1)], -1)
        call = (
            states @ policy.call_head.weight[0] + policy.call_head.bias
            + confidence @ policy.call_confidence.weight[0] + mean @ policy.call_prompt.weight[0]
        )
        return torch.cat([token_logits, call[:, None]], dim=-1)

    @abstractmethod
    def generated_tokens(self, sequences: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """The new tokens of ``generate``'s output (T5: after the start token; a causal LM: after the prompt)."""

    @abstractmethod
    def counted_modules(self, model: PreTrainedModel) -> dict[str, torch.nn.Module]:
        """The modules whose forwards a test counts: T5's encoder and decoder, a causal LM's body."""

    @abstractmethod
    def forward_counts(self, steps: int, prompt_reads: int) -> dict[str, int]:
        """What :meth:`counted_modules` run for ``steps`` decoding forwards and ``prompt_reads`` reads of a
        batch's prompts (T5: the encoder; a causal LM: the prefill, a forward of the body too)."""


class EncoderDecoderTiny(TinyFamily):
    def teacher_lm(self, vocab_size: int, seed: int) -> PreTrainedModel:
        return tiny_t5(vocab_size, 32, 2, seed=seed)

    def student_lm(self, vocab_size: int, seed: int) -> PreTrainedModel:
        return tiny_t5(vocab_size, 16, 1, seed=seed)

    @torch.no_grad()
    def reference_logits(self, model: PreTrainedModel, context: list[int], inputs: list[int]) -> torch.Tensor:
        ids = torch.tensor([context])
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=torch.tensor([inputs])).logits[0]

    def stream_start(self, model: PreTrainedModel, prompt: list[int]) -> tuple[list[int], int]:
        return list(prompt), model.config.decoder_start_token_id

    def _prompt_states(self, model: PreTrainedModel, context: list[int]) -> torch.Tensor:
        return model.get_encoder()(input_ids=torch.tensor([context])).last_hidden_state[0]

    def _stream(self, model: PreTrainedModel, context: list[int], embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = BaseModelOutput(last_hidden_state=model.get_encoder()(input_ids=torch.tensor([context])).last_hidden_state)
        states = model.get_decoder()(inputs_embeds=embeds[None], encoder_hidden_states=encoded.last_hidden_state).last_hidden_state
        # The token logits through the model's own forward: its LM head, rescaled as T5 does when tied.
        logits = model(encoder_outputs=encoded, decoder_inputs_embeds=embeds[None]).logits
        return states[0], logits[0]

    def generated_tokens(self, sequences: torch.Tensor, prompt_width: int) -> torch.Tensor:
        return sequences[:, 1:]

    def counted_modules(self, model: PreTrainedModel) -> dict[str, torch.nn.Module]:
        return {"encoder": model.get_encoder(), "decoder": model.get_decoder()}

    def forward_counts(self, steps: int, prompt_reads: int) -> dict[str, int]:
        return {"encoder": prompt_reads, "decoder": steps}


class DecoderOnlyTiny(TinyFamily):
    def teacher_lm(self, vocab_size: int, seed: int) -> PreTrainedModel:
        """A Llama with an untied head, its weights drawn wider than a Llama's default (std 0.3, not 0.02),
        so that its next-token distributions are peaked and its log-probs spread over several nats, as
        a trained model's do (not all near -log V)."""
        return tiny_causal_lm(vocab_size, 32, 2, seed=seed, arch="llama", initializer_range=0.3)

    def student_lm(self, vocab_size: int, seed: int) -> PreTrainedModel:
        """A smaller Qwen2 with tied embeddings."""
        return tiny_causal_lm(vocab_size, 16, 1, seed=seed, arch="qwen2", tied=True)

    @torch.no_grad()
    def reference_logits(self, model: PreTrainedModel, context: list[int], inputs: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([[*context, *inputs]])).logits[0, len(context):]

    def stream_start(self, model: PreTrainedModel, prompt: list[int]) -> tuple[list[int], int]:
        return list(prompt[:-1]), prompt[-1]

    def _prompt_states(self, model: PreTrainedModel, context: list[int]) -> torch.Tensor:
        if not context:
            return torch.zeros(0, model.config.hidden_size)
        return model.base_model(input_ids=torch.tensor([context])).last_hidden_state[0]

    def _stream(self, model: PreTrainedModel, context: list[int], embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = torch.cat([model.get_input_embeddings()(torch.tensor(context, dtype=torch.long)), embeds])
        states = model.base_model(inputs_embeds=inputs[None]).last_hidden_state[0, len(context):]
        return states, model.lm_head(states)

    def generated_tokens(self, sequences: torch.Tensor, prompt_width: int) -> torch.Tensor:
        return sequences[:, prompt_width:]

    def counted_modules(self, model: PreTrainedModel) -> dict[str, torch.nn.Module]:
        return {"body": model.base_model}

    def forward_counts(self, steps: int, prompt_reads: int) -> dict[str, int]:
        return {"body": steps + prompt_reads}


FAMILIES: dict[str, TinyFamily] = {f.name: f for f in (
    EncoderDecoderTiny("encoder-decoder", AutoModelForSeq2SeqLM, IncrementalDecoder, make_eager_to_end_student,
                       prompt_ends_with_eos=True),
    DecoderOnlyTiny("decoder-only", AutoModelForCausalLM, CausalIncrementalDecoder, make_eager_to_end_causal_student,
                    prompt_ends_with_eos=False),
)}


def family_of_model(model: PreTrainedModel) -> TinyFamily:
    """The :class:`TinyFamily` of a model, read from its config."""
    return FAMILIES["encoder-decoder" if model.config.is_encoder_decoder else "decoder-only"]


def only_family(name: str):
    """Run a test that takes the ``family`` fixture for one family only (its behaviour is that family's)."""
    return pytest.mark.parametrize("family", [name], indirect=True)


def right_padded(lengths: list[int], vocab_size: int, generator: torch.Generator, eos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random prompts ``(ids, mask)`` of the given lengths (ids ≥ 2: no pad, no EOS), each
    ending in EOS when ``eos`` (as a T5 tokenizer's do)."""
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        n = length - 1 if eos else length
        ids[i, :n] = torch.randint(2, vocab_size, (n,), generator=generator)
        if eos:
            ids[i, n] = EOS
        mask[i, :length] = 1
    return ids, mask
