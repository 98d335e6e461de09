"""A tiny, download-free Training Wheels task for tests: the synthetic language's real word-level
tokenizer, two tiny random T5s (teacher and student) and a few hundred examples on disk."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

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


def make_tiny_task(root: Path, n_train: int = 200, n_validation: int = 40) -> TinyTask:
    root = Path(root)
    language = SyntheticLanguage(seed=0, n_words=60, n_target_words=60)
    tokenizer = build_tokenizer(language)
    vocab = padded_vocab_size(tokenizer)
    task = TinyTask(root / "teacher", root / "student", root / "tokenizer", root / "train.jsonl", root / "validation.jsonl")
    tokenizer.save_pretrained(task.tokenizer_dir)
    tiny_t5(vocab, 32, 2, seed=1).save_pretrained(task.teacher_dir)
    tiny_t5(vocab, 16, 1, seed=2).save_pretrained(task.student_dir)
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
