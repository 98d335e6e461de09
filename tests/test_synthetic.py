"""Tests of the embedded Synthetic task (tw_env/synthetic.py).

The fast tests check the generator, the tokenizer and the cache mechanics in seconds; the test
marked ``slow`` trains the real teacher and student (about 2.5 minutes on two CPU cores).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

import tw_env.synthetic as syn
from tw_env.prompts import BUDGET_KEYWORDS, make_prompt
from tw_env.registration import make_task
from tw_env.synthetic import (
    SYNTHETIC_INSTRUCTION,
    SyntheticLanguage,
    build_tokenizer,
    ensure_synthetic_models,
    evaluate_bleu,
    load_split,
    padded_vocab_size,
    student_config,
    teacher_config,
)
from tw_env.task import check_reads_digits


@pytest.fixture(scope="module")
def language() -> SyntheticLanguage:
    return SyntheticLanguage(seed=0)


@pytest.fixture(scope="module")
def splits(language: SyntheticLanguage) -> dict[str, list[dict[str, str]]]:
    return language.splits(seed=0)


@pytest.fixture(scope="module")
def tokenizer(language: SyntheticLanguage):
    return build_tokenizer(language)


# ---------------------------------------------------------------------- generator


def test_same_seed_same_pairs() -> None:
    a = SyntheticLanguage(seed=0).sample(200, rng_seed=5)
    b = SyntheticLanguage(seed=0).sample(200, rng_seed=5)
    assert a == b
    assert all(set(row) == {"source", "target"} for row in a)


def test_different_seeds_differ() -> None:
    base = SyntheticLanguage(seed=0)
    assert base.sample(50, rng_seed=1) != base.sample(50, rng_seed=2)
    other = SyntheticLanguage(seed=1)
    assert other.table != base.table
    assert other.source_words != base.source_words
    assert other.sample(50, rng_seed=1) != base.sample(50, rng_seed=1)


def test_language_is_frozen(language: SyntheticLanguage) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        language.seed = 3  # type: ignore[misc]


def test_splits_sizes_deterministic_and_disjoint(language: SyntheticLanguage, splits) -> None:
    assert set(splits) == {"train", "validation", "test"}
    assert len(splits["validation"]) == 1000 and len(splits["test"]) == 1000
    assert 20_000 <= len(splits["train"]) <= 60_000
    again = SyntheticLanguage(seed=0).splits(seed=0)
    for name in splits:
        assert again[name] == splits[name]
    sources = {name: {r["source"] for r in rows} for name, rows in splits.items()}
    assert len(sources["test"]) == 1000 and len(sources["validation"]) == 1000  # no duplicates inside
    assert not sources["train"] & sources["test"]
    assert not sources["train"] & sources["validation"]
    assert not sources["validation"] & sources["test"]
    assert language.splits(seed=1)["test"] != splits["test"]


def test_sentence_structure(language: SyntheticLanguage, splits) -> None:
    for row in splits["test"]:
        topic, *words = row["source"].split()
        t = language.topic_words.index(topic)
        assert language.min_len <= len(words) <= language.max_len
        assert len(set(words)) == len(words)  # distinct content words
        expected = [language.target_words[language.table[t][language.source_words.index(w)]] for w in words]
        assert row["target"] == f"{language.topic_names[t]}: {' '.join(expected)}."


def test_table_is_context_dependent(language: SyntheticLanguage) -> None:
    # Most words translate differently under at least two topics: a dictionary would be too easy.
    varying = sum(len({language.table[t][w] for t in range(language.n_topics)}) > 1
                  for w in range(language.n_words))
    assert varying > 0.9 * language.n_words


def test_reorder_moves_last_word_first() -> None:
    plain, reordered = SyntheticLanguage(seed=0), SyntheticLanguage(seed=0, reorder=True)
    src_a, tgt_a = plain.translate(0, [1, 2, 3, 4])
    src_b, tgt_b = reordered.translate(0, [1, 2, 3, 4])
    assert src_a == src_b
    words_a = tgt_a.rstrip(".").split()[1:]
    assert tgt_b.rstrip(".").split()[1:] == [words_a[-1], *words_a[:-1]]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        SyntheticLanguage(n_topics=0)
    with pytest.raises(ValueError):
        SyntheticLanguage(min_len=5, max_len=4)
    with pytest.raises(ValueError):
        SyntheticLanguage(sense_prob=1.5)


# ---------------------------------------------------------------------- tokenizer


def test_special_token_ids(tokenizer) -> None:
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    ids = tokenizer("sky: mu.")["input_ids"]
    assert ids[-1] == 1 and ids.count(1) == 1


def test_template_words_in_vocabulary(tokenizer) -> None:
    for budget in BUDGET_KEYWORDS:
        prompt = make_prompt(SYNTHETIC_INSTRUCTION, "", budget)
        ids = tokenizer(prompt)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt.rstrip()
    words = tokenizer.convert_ids_to_tokens(tokenizer("With very high teacher use,")["input_ids"])
    assert words == ["\u2581With", "\u2581very", "\u2581high", "\u2581teacher", "\u2581use", ",", "</s>"]
    assert len(tokenizer("moderate-light")["input_ids"]) == 2  # one word + EOS


def test_round_trip_and_no_unk_on_all_splits(tokenizer, splits) -> None:
    budgets = sorted(BUDGET_KEYWORDS)
    unk = tokenizer.unk_token_id
    for name, rows in splits.items():
        targets = [r["target"] for r in rows]
        prompts = [make_prompt(SYNTHETIC_INSTRUCTION, r["source"], budgets[i % len(budgets)])
                   for i, r in enumerate(rows)]
        for texts in (targets, prompts):
            encoded = tokenizer(texts)["input_ids"]
            assert not any(unk in ids for ids in encoded), name
            assert tokenizer.batch_decode(encoded, skip_special_tokens=True) == texts, name


def test_target_length_fits_episode(tokenizer, splits) -> None:
    lengths = [len(ids) for ids in tokenizer([r["target"] for r in splits["train"]])["input_ids"]]
    assert max(lengths) <= 17  # at most 16 tokens + EOS, within max_new_tokens=20


def test_batch_encoder_matches_full_prompts(language, tokenizer) -> None:
    # Training concatenates prefix ids and source ids; they must equal the tokenised prompt.
    rows = language.sample(60, rng_seed=3)
    budgets = [sorted(BUDGET_KEYWORDS)[i % 6] for i in range(60)]
    input_ids, mask, labels = syn._BatchEncoder(tokenizer, rows).batch(range(60), budgets)
    full = tokenizer([make_prompt(SYNTHETIC_INSTRUCTION, r["source"], b) for r, b in zip(rows, budgets, strict=True)],
                     padding=True, return_tensors="pt")
    assert input_ids.tolist() == full["input_ids"].tolist()
    assert mask.tolist() == full["attention_mask"].tolist()
    targets = tokenizer([r["target"] for r in rows], padding=True, return_tensors="pt")["input_ids"]
    assert labels.masked_fill(labels == -100, 0).tolist() == targets.tolist()
    assert (labels == -100).sum() == (targets == 0).sum() > 0
    # Rows are tokenized a batch at a time on first sight and cached: a later batch that mixes seen rows,
    # unseen ones and a row twice gives the same tensors as tokenizing its prompts afresh.
    encoder = syn._BatchEncoder(tokenizer, rows)
    encoder.batch(range(20), budgets[:20])
    mixed = [5, 40, 5, 19, 59, 40]
    again, _, again_labels = encoder.batch(mixed, [budgets[i] for i in mixed])
    assert again.tolist() == syn._BatchEncoder(tokenizer, rows).batch(mixed, [budgets[i] for i in mixed])[0].tolist()
    assert again.tolist() == tokenizer([make_prompt(SYNTHETIC_INSTRUCTION, rows[i]["source"], budgets[i]) for i in mixed],
                                       padding=True, return_tensors="pt")["input_ids"].tolist()
    assert again_labels.masked_fill(again_labels == -100, 0).tolist() == tokenizer(
        [rows[i]["target"] for i in mixed], padding=True, return_tensors="pt")["input_ids"].tolist()


def test_tokenizer_save_load(tokenizer, tmp_path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer.save_pretrained(str(tmp_path))
    loaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    text = make_prompt(SYNTHETIC_INSTRUCTION, "ri fizo", 0.2)
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert len(loaded) == len(tokenizer)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)


def test_vocab_size_multiple_of_8_and_shared(tokenizer) -> None:
    v = padded_vocab_size(tokenizer)
    assert v % 8 == 0 and len(tokenizer) <= v < len(tokenizer) + 8
    t, s = teacher_config(v), student_config(v)
    assert t.vocab_size == s.vocab_size == v
    for cfg in (t, s):
        assert (cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id) == (0, 1, 0)
    assert t.d_model > s.d_model


# ---------------------------------------------------------------------- cache


@pytest.fixture
def tiny_specs(monkeypatch):
    """Train for a handful of steps only, so the cache mechanics can be tested in seconds."""
    monkeypatch.setattr(syn, "TEACHER_SPEC", dataclasses.replace(syn.TEACHER_SPEC, steps=3, warmup=1))
    monkeypatch.setattr(syn, "STUDENT_SPEC", dataclasses.replace(syn.STUDENT_SPEC, steps=3, warmup=1))


def test_ensure_builds_cache_then_reuses_it(tiny_specs, tmp_path, monkeypatch) -> None:
    assets = ensure_synthetic_models(tmp_path, seed=0)
    assert assets.root == tmp_path / f"synthetic-{syn.FORMAT_VERSION}-seed0"
    for d in (assets.teacher_dir, assets.student_dir):
        assert (d / "model.safetensors").is_file()
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["vocab_size"] % 8 == 0
    t_cfg = json.loads((assets.teacher_dir / "config.json").read_text())
    s_cfg = json.loads((assets.student_dir / "config.json").read_text())
    assert t_cfg["vocab_size"] == s_cfg["vocab_size"]
    assert [p.name for p in tmp_path.iterdir()] == [assets.root.name]  # no temporary leftovers
    test = load_split(assets.data_dir, "test")
    assert len(test) == 1000 and test == SyntheticLanguage(seed=0).splits(seed=0)["test"]

    def boom(*args, **kwargs):
        raise AssertionError("a complete cache must not be retrained")

    monkeypatch.setattr(syn, "train_model", boom)
    assert ensure_synthetic_models(tmp_path, seed=0) == assets
    monkeypatch.setenv("TW_CACHE_DIR", str(tmp_path))
    assert ensure_synthetic_models(seed=0) == assets
    bleu = evaluate_bleu(assets.student_dir, assets.tokenizer_dir, test[:16], max_new_tokens=5)
    assert 0.0 <= bleu <= 100.0


def test_interrupted_build_leaves_nothing(tiny_specs, tmp_path, monkeypatch) -> None:
    real = syn.train_model

    def fail_on_student(spec, *args, **kwargs):
        if spec is syn.STUDENT_SPEC:
            raise KeyboardInterrupt
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(syn, "train_model", fail_on_student)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_models(tmp_path, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_training_is_deterministic(tiny_specs, tmp_path) -> None:
    from safetensors.torch import load_file

    a = ensure_synthetic_models(tmp_path / "a", seed=0)
    b = ensure_synthetic_models(tmp_path / "b", seed=0)
    for name in ("teacher_dir", "student_dir"):
        wa = load_file(str(getattr(a, name) / "model.safetensors"))
        wb = load_file(str(getattr(b, name) / "model.safetensors"))
        assert wa.keys() == wb.keys()
        assert all(bool((wa[k] == wb[k]).all()) for k in wa)


def test_first_use_says_what_it_trains_and_shows_progress(tiny_specs, tmp_path, capsys) -> None:
    assets = ensure_synthetic_models(tmp_path, seed=0)
    captured = capsys.readouterr()
    # One line on stderr before anything else: what is trained, about how long, where it is cached.
    first = captured.err.splitlines()[0]
    assert first == ("Training the embedded Synthetic teacher and student (first use, about 5 minutes "
                     f"on 2 CPU cores); cached in {assets.root}")
    # Then a tqdm bar over each model's training steps, run to the end (3 steps in tiny_specs).
    for name in ("teacher", "student"):
        assert f"Synthetic {name}: 100%" in captured.err
    assert "| 3/3 [" in captured.err and "step/s]" in captured.err
    assert "Writing model shards" not in captured.err  # transformers' own bar of save_pretrained
    assert captured.out == ""
    # A complete cache is returned silently.
    assert ensure_synthetic_models(tmp_path, seed=0) == assets
    assert capsys.readouterr() == ("", "")


def test_progress_off_is_silent(tiny_specs, tmp_path, capsys) -> None:
    ensure_synthetic_models(tmp_path, seed=0, progress=False)
    assert capsys.readouterr() == ("", "")


def test_the_progress_bar_does_not_change_the_weights(tokenizer, splits, capsys) -> None:
    spec = dataclasses.replace(syn.STUDENT_SPEC, steps=3, warmup=1)
    rows = splits["train"][:256]
    quiet = syn.train_model(spec, padded_vocab_size(tokenizer), tokenizer, rows, seed=2)
    assert capsys.readouterr().err == ""
    shown = syn.train_model(spec, padded_vocab_size(tokenizer), tokenizer, rows, seed=2, progress="bar")
    assert "bar: 100%" in capsys.readouterr().err
    a, b = quiet.state_dict(), shown.state_dict()
    assert a.keys() == b.keys()
    assert all(bool((a[k] == b[k]).all()) for k in a)


# ---------------------------------------------------------------------- the real models


@pytest.mark.slow
def test_teacher_clearly_beats_student(tmp_path) -> None:
    assets = ensure_synthetic_models(tmp_path, seed=0)
    test = load_split(assets.data_dir, "test")[:500]
    teacher = evaluate_bleu(assets.teacher_dir, assets.tokenizer_dir, test)
    student = evaluate_bleu(assets.student_dir, assets.tokenizer_dir, test)
    assert teacher >= student + 15, (teacher, student)
    assert teacher >= 50, teacher


# ---------------------------------------------------------------------- the numeric-budget pair (issue 31)


def test_the_digit_tokenizer_reads_numeric_budgets_and_keeps_every_other_id(language, tokenizer, splits) -> None:
    digits = syn.build_tokenizer(language, digits=True)
    assert len(digits) == len(tokenizer) + 11
    prompt = make_prompt(syn.SYNTHETIC_INSTRUCTION, splits["train"][0]["source"], 0.15, "numeric")
    pieces = digits.tokenize(prompt)
    assert pieces[:7] == ["▁With", "▁teacher", "▁use", "▁", "0", ".", "1"] and pieces[7] == "5"
    assert digits.unk_token_id not in digits(prompt)["input_ids"]
    check_reads_digits(digits)  # what Task.build asks of a numeric task
    with pytest.raises(ValueError, match="reads digits"):
        check_reads_digits(tokenizer)
    # Text without digits (every keyword prompt, every source and target) has the same ids as before.
    for row in splits["train"][:50]:
        for text in (make_prompt(syn.SYNTHETIC_INSTRUCTION, row["source"], 0.3), row["target"]):
            assert digits(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_the_numeric_pair_trains_on_numeric_prompts_and_its_task_states_budgets_as_numbers(
        tiny_specs, tmp_path, monkeypatch) -> None:
    shown: list[str] = []
    real_train = syn.train_model

    def recording(spec, vocab_size, tokenizer, rows, **kwargs):
        shown.append(kwargs["budget_style"])
        return real_train(spec, vocab_size, tokenizer, rows, **kwargs)

    monkeypatch.setattr(syn, "train_model", recording)
    assets = syn.ensure_synthetic_models(cache_dir=tmp_path, pair="synthetic-numeric", progress=False)
    assert assets.teacher_dir.parent.name == f"synthetic-numeric-{syn.NUMERIC_FORMAT_VERSION}-seed0"
    assert shown == ["numeric", "numeric"]
    task = make_task("TrainingWheels-SyntheticNumeric-v0", cache_dir=str(tmp_path), limit=4)
    assert task.budget_style == "numeric"
    ids = task.prompts([task.examples[0].source], [0.15], "cpu")[0][0].tolist()
    assert task.tokenizer.decode(ids, skip_special_tokens=True).startswith("With teacher use 0.15,")
    encoder = syn._BatchEncoder(task.tokenizer, [{"source": "a", "target": "b"}], "numeric")
    assert encoder.prefix(0.1) == task.tokenizer(make_prompt(syn.SYNTHETIC_INSTRUCTION, "", 0.1, "numeric"),
                                                 add_special_tokens=False)["input_ids"]
