"""`tw train-mt`: the translation teacher/student trainer at a tiny size (seconds): what it writes, that
transformers loads it, that a killed run resumes to the weights of an uninterrupted one, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scripts import train_translation as mt
from scripts.train_translation import ModelSize, TranslationConfig

PAIRS = [
    ("der hund läuft", "the dog runs"), ("die katze schläft", "the cat sleeps"), ("ein baum", "a tree"),
    ("das haus ist rot", "the house is red"), ("der hund ist klein", "the dog is small"),
    ("die katze ist groß", "the cat is big"), ("ein roter baum", "a red tree"), ("das kleine haus", "the small house"),
]

VALIDATION = [("zwei vögel", "two birds"), ("ein kind singt", "a child sings"), ("der baum ist grün", "the tree is green"),
              ("die sonne scheint", "the sun shines")]


def write_data(root: Path) -> tuple[Path, Path]:
    train, validation = root / "train.jsonl", root / "validation.jsonl"
    rows = [{"de": de, "en": en, "corpus": "multi30k-task1-train" if i % 2 else "tatoeba-x"}
            for i, (de, en) in enumerate(PAIRS * 5)]
    rows.append({"de": "nachrichten", "en": "news", "corpus": "newstest2009-deen"})  # not selected
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    validation.write_text("".join(json.dumps({"de": de, "en": en, "corpus": "multi30k-task1-val"}) + "\n"
                                  for de, en in [*VALIDATION, PAIRS[0]]))  # PAIRS[0] is a training sentence too
    return train, validation


def tiny_config(root: Path, out: str = "out", **overrides) -> TranslationConfig:
    train, validation = write_data(root)
    values = dict(
        train_data=str(train), validation_data=str(validation), output_dir=str(root / out), vocab_size=120,
        teacher=ModelSize(d_model=16, num_layers=1, d_ff=32, num_heads=2, steps=6, lr=1e-2, warmup=2),
        student=ModelSize(d_model=8, num_layers=1, d_ff=16, num_heads=2, steps=6, lr=1e-2, warmup=2),
        batch_size=8, max_source_length=24, max_target_length=8, eval_every=3, eval_examples=4,
        checkpoint_every=2, threads=1, selection_examples=2,
    )
    values.update(overrides)
    return TranslationConfig(**values)


def test_trains_tokenizer_teacher_and_student_that_transformers_loads(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    summary = mt.run(tiny_config(tmp_path))
    out = tmp_path / "out"
    assert summary["tokenizer"]["training_pairs"] == 40  # the newstest row is not in the selected corpora
    for name, width in (("teacher", 16), ("student", 8)):
        model = AutoModelForSeq2SeqLM.from_pretrained(out / name)
        tokenizer = AutoTokenizer.from_pretrained(out / name)
        assert model.config.d_model == width and len(tokenizer) <= model.config.vocab_size
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
        assert [e["step"] for e in summary[name]["evaluations"]] == [3, 6]
        assert 0.0 <= summary[name]["validation_bleu"] <= 100.0
    # The tokenizer round-trips German text and appends EOS, as the env's T5 convention expects.
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    ids = tokenizer("der hund läuft")["input_ids"]
    assert ids[-1] == 1 and tokenizer.decode(ids, skip_special_tokens=True) == "der hund läuft"
    # A finished run is not retrained.
    assert mt.run(tiny_config(tmp_path)) == summary


def test_a_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    reference = mt.run(tiny_config(tmp_path, "reference"))
    real_write = mt.ckpt.write_checkpoint

    def write_then_die(run_dir, step, writer, keep=2):
        path = real_write(run_dir, step, writer, keep)
        if run_dir.name == "student" and step == 4:
            raise KeyboardInterrupt  # killed mid-way through the student, after a checkpoint
        return path

    monkeypatch.setattr(mt.ckpt, "write_checkpoint", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        mt.run(tiny_config(tmp_path, "killed"))
    assert not (tmp_path / "killed" / "student").exists() and (tmp_path / "killed" / "teacher").exists()
    monkeypatch.setattr(mt.ckpt, "write_checkpoint", real_write)
    resumed = mt.run(tiny_config(tmp_path, "killed"))
    for name in ("teacher", "student"):
        want = load_file(tmp_path / "reference" / name / "model.safetensors")
        got = load_file(tmp_path / "killed" / name / "model.safetensors")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
        assert resumed[name]["evaluations"] == reference[name]["evaluations"]


def test_new_models_start_with_unit_scale_tokens_and_a_loss_near_log_vocab():
    # T5's own recipe: the tied embedding at std 1 (token vectors that the first attention outputs
    # do not swamp) and the d_model**-0.5 output scaling, without which the first logits would have
    # std sqrt(d_model) and the loss would start far above log(vocab).
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    vocab, size = 512, ModelSize(d_model=64, num_layers=1, d_ff=128, num_heads=2)
    model = T5ForConditionalGeneration(mt.t5_config(size, vocab))
    assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()  # tied
    assert 0.9 < float(model.shared.weight.detach().std()) < 1.1
    ids = torch.randint(2, vocab, (16, 12))
    loss = model(input_ids=ids, labels=torch.randint(2, vocab, (16, 10))).loss.item()
    assert abs(loss - math.log(vocab)) < 1.0, loss


def test_batches_are_a_function_of_the_step(tmp_path):
    from transformers import AutoTokenizer

    mt.run(tiny_config(tmp_path, eval_every=0))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    pairs = mt.read_pairs(tmp_path / "train.jsonl", "de", "en", ["multi30k", "tatoeba"])
    config = tiny_config(tmp_path)
    a, b = mt.Batches(tokenizer, pairs, config), mt.Batches(tokenizer, pairs, config)
    for step in (7, 0, 3):  # any order
        x, y = a.batch(step), b.batch(step)
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a.batch(0)["labels"], a.batch(1)["labels"])


def test_writes_the_task_data_folder_that_the_wmt19_task_reads(tmp_path):
    import gymnasium as gym
    import numpy as np

    import tw_env  # noqa: F401  (registers the tasks)

    summary = mt.run(tiny_config(tmp_path))
    out = tmp_path / "out"
    assert summary["data"]["train"] == 40 and summary["data"]["validation"] + summary["data"]["test"] == 4
    rows = {split: [json.loads(line) for line in (out / "data" / f"{split}.jsonl").open()]
            for split in ("train", "validation", "test")}
    selection, test = ({r["de"] for r in rows[s]} for s in ("validation", "test"))
    # Disjoint, all of validation but the sentence that is also a training row.
    assert not selection & test and selection | test == {de for de, _ in VALIDATION}
    assert all(r["corpus"].startswith(("multi30k", "tatoeba")) for r in rows["train"])
    env = gym.make("TrainingWheels-WMT19-v0", teacher=str(out / "teacher"), student=str(out / "student"),
                   tokenizer=str(out / "tokenizer"), data=str(out / "data"), split="test", max_new_tokens=4)
    vocab_size = env.unwrapped.vocab_size
    assert env.action_space.n == vocab_size + 1  # the vocabulary plus <τ>
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(vocab_size)  # <τ>: the teacher writes the token
    assert np.isfinite(reward) and info["teacher_call"] and obs["state_length"][0] == 1


@pytest.mark.parametrize("overrides, error, message", [
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(train_data="missing.jsonl"), FileNotFoundError, "no data file"),
    (dict(corpora=["europarl"]), ValueError, "no pairs"),
    (dict(selection_examples=5), ValueError, "leaves no test rows"),
])
def test_bad_input_is_refused(tmp_path, overrides, error, message):
    config = tiny_config(tmp_path, **overrides)
    with pytest.raises(error, match=message):
        mt.run(config)


def test_cli_runs_train_mt(tmp_path):
    from dataclasses import asdict

    from scripts.cli import main

    config = asdict(tiny_config(tmp_path, "cli", eval_every=0))
    path = tmp_path / "mt.json"
    path.write_text(json.dumps(config))
    student = json.dumps({**config["student"], "steps": 2})
    assert main(["train-mt", "--config", str(path), "--student", student]) == 0
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["student"]["steps"] == 2
    assert (tmp_path / "cli" / "student" / "model.safetensors").is_file()
