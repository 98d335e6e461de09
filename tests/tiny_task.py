"""A tiny, download-free Training Wheels task for tests: the synthetic language's real word-level
tokenizer, two tiny random models (teacher and student: T5s, or causal LMs with
:func:`make_tiny_causal_task`) and a few hundred examples on disk."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
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

from tw_env.synthetic import SyntheticLanguage, build_tokenizer, padded_vocab_size


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
    vocab = _tiny_vocab()
    return _write_task(Path(root), tiny_t5(vocab, 32, 2, seed=1), tiny_t5(vocab, 16, 1, seed=2), n_train, n_validation)


def make_tiny_causal_task(root: Path, n_train: int = 200, n_validation: int = 40) -> TinyTask:
    """The tiny task with a decoder-only pair sharing the vocabulary: a Llama teacher (untied head) and
    a smaller Qwen2 student (tied embeddings). The teacher's weights are drawn wider than a Llama's
    default (std 0.3, not 0.02), so that its next-token distributions are peaked and its log-probs
    spread over several nats, as a trained model's do (not all near -log V)."""
    vocab = _tiny_vocab()
    teacher = tiny_causal_lm(vocab, 32, 2, seed=1, arch="llama", initializer_range=0.3)
    student = tiny_causal_lm(vocab, 16, 1, seed=2, arch="qwen2", tied=True)
    return _write_task(Path(root), teacher, student, n_train, n_validation)


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
