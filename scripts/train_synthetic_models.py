"""Train (or find in the cache) the embedded Synthetic teacher and student, and report on them.

Usage::

    python -m scripts.train_synthetic_models [--cache-dir DIR] [--seed 0] [--force] [--causal]

Training (first use, or ``--force``; about 2 minutes on 2 CPU cores) says so on stderr, shows a
progress bar per model and prints the loss every 500 steps. Then it prints the test BLEU of both
models (greedy decoding, sacrebleu), the gap, the training time, parameter counts, the vocabulary
size, the mean target length, and where the student's errors sit (teacher-forced token accuracy by
how often the (topic, word) pair occurs in the training split).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from tw_env.prompts import make_prompt
from tw_env.synthetic import (
    SYNTHETIC_INSTRUCTION,
    ensure_synthetic_models,
    evaluate_bleu,
    load_split,
)

# Buckets of training-set frequency of a (topic, content word) pair, for the error analysis.
_FREQ_BUCKETS = ((0, 19), (20, 49), (50, 99), (100, 299), (300, 10**9))


def _token_correctness(model_dir: Path, tokenizer, test: list[dict]) -> list[list[bool]]:
    """Per target token (EOS included): is the teacher-forced argmax prediction right?"""
    import torch

    from tw_env.families import family_of
    from tw_env.models import load_model
    from tw_env.synthetic import _BatchEncoder

    model = load_model(str(model_dir))
    family = family_of(model)
    out: list[list[bool]] = []
    with torch.inference_mode():
        for i in range(0, len(test), 100):
            rows = test[i: i + 100]
            # The "no teacher use" prompts as the models were trained on them; the family reads prompt and target.
            ids, mask, labels = _BatchEncoder(tokenizer, rows).batch(range(len(rows)), [0.0] * len(rows))
            logits = family.teacher_forced_logits(model, ids, mask, labels.clamp(min=0))
            right = logits.argmax(-1) == labels
            for j in range(len(rows)):
                n = int((labels[j] != -100).sum())
                out.append(right[j, :n].tolist())
    return out


def _error_analysis(teacher_dir: Path, student_dir: Path, tokenizer, train: list[dict],
                    test: list[dict]) -> None:
    """Print where the student's errors sit: token accuracy by (topic, word) training frequency."""

    def pairs(source: str) -> list[tuple[str, str]]:
        topic, *words = source.split()
        return [(topic, w) for w in words]

    counts = Counter(p for row in train for p in pairs(row["source"]))
    teacher = _token_correctness(teacher_dir, tokenizer, test)
    student = _token_correctness(student_dir, tokenizer, test)
    labels = [f"pair seen {lo}-{hi}x" if hi < 10**9 else f"pair seen {lo}+x" for lo, hi in _FREQ_BUCKETS]
    stats = {g: [0, 0, 0] for g in ["structure", *labels]}  # tokens, teacher right, student right
    helpful = student_wrong = 0
    for row, t_ok, s_ok in zip(test, teacher, student, strict=True):
        # Target tokens: topic gloss, ":", one token per content word, ".", EOS.
        groups = ["structure", "structure"]
        for pair in pairs(row["source"]):
            c = counts[pair]
            groups.append(next(lab for lab, (lo, hi) in zip(labels, _FREQ_BUCKETS, strict=True) if lo <= c <= hi))
        groups += ["structure", "structure"]
        assert len(groups) == len(t_ok) == len(s_ok), row
        for g, t, s in zip(groups, t_ok, s_ok, strict=True):
            stats[g][0] += 1
            stats[g][1] += t
            stats[g][2] += s
            student_wrong += not s
            helpful += t and not s
    print("teacher-forced token accuracy, by how often the (topic, word) pair occurs in train:")
    for g, (n, t, s) in stats.items():
        if n:
            print(f"  {g:<22} {n:5d} tokens  teacher {100 * t / n:5.1f}%  student {100 * s / n:5.1f}%")
    total = sum(n for n, _, _ in stats.values())
    print(f"  student wrong on {100 * student_wrong / total:.1f}% of target tokens; "
          f"the teacher is right on {100 * helpful / max(1, student_wrong):.1f}% of those")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $TW_CACHE_DIR or ~/.cache/training_wheels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain even if the cache is complete")
    parser.add_argument("--n-test", type=int, default=1000, help="test examples for BLEU (at most 1000)")
    parser.add_argument("--no-analysis", action="store_true", help="skip the per-token error analysis")
    parser.add_argument("--causal", action="store_true",
                        help="the decoder-only (Llama) pair of TrainingWheels-SyntheticCausal-v0 instead of the T5 one")
    args = parser.parse_args(argv)

    import torch
    from transformers import PreTrainedTokenizerFast

    start = time.perf_counter()
    assets = ensure_synthetic_models(args.cache_dir, seed=args.seed, verbose=True, force=args.force, causal=args.causal)
    wall = time.perf_counter() - start
    meta = json.loads((assets.root / "COMPLETE.json").read_text())

    torch.set_num_threads(2)
    test = load_split(assets.data_dir, "test")[: args.n_test]
    start = time.perf_counter()
    teacher_bleu = evaluate_bleu(assets.teacher_dir, assets.tokenizer_dir, test)
    student_bleu = evaluate_bleu(assets.student_dir, assets.tokenizer_dir, test)
    eval_seconds = time.perf_counter() - start

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(assets.tokenizer_dir))
    target_lens = [len(ids) for ids in tokenizer([r["target"] for r in test])["input_ids"]]
    prompt_lens = [len(ids) for ids in tokenizer(
        [make_prompt(SYNTHETIC_INSTRUCTION, r["source"], 0.5) for r in test])["input_ids"]]

    def n_params(path: Path) -> int:
        from tw_env.models import load_model

        # parameters() counts the tied input/output embedding once.
        return sum(p.numel() for p in load_model(str(path)).parameters())

    print(f"cache folder        : {assets.root}  (format {meta['format_version']}, seed {args.seed})")
    print(f"ensure call         : {wall:.1f} s wall ({'trained now' if wall > 5 else 'found in cache'})")
    secs = meta["train_seconds"]
    print(f"training time       : teacher {secs['teacher']:.1f} s + student {secs['student']:.1f} s "
          f"= {secs['teacher'] + secs['student']:.1f} s ({meta['teacher']['steps']} + "
          f"{meta['student']['steps']} steps, batch {meta['teacher']['batch_size']}, 2 threads)")
    print(f"parameters          : teacher {n_params(assets.teacher_dir):,}  student {n_params(assets.student_dir):,}")
    print(f"vocabulary          : {len(tokenizer)} tokens, model vocab_size {meta['vocab_size']}")
    print(f"target length       : mean {sum(target_lens) / len(target_lens):.2f} tokens incl. EOS "
          f"(max {max(target_lens)}); prompt mean {sum(prompt_lens) / len(prompt_lens):.2f} tokens")
    print(f"test BLEU ({len(test)} ex.) : teacher {teacher_bleu:.1f}  student {student_bleu:.1f}  "
          f"gap {teacher_bleu - student_bleu:.1f}   (eval {eval_seconds:.1f} s)")
    if not args.no_analysis:
        _error_analysis(assets.teacher_dir, assets.student_dir, tokenizer,
                        load_split(assets.data_dir, "train"), test)

if __name__ == "__main__":
    main()
