"""Which examples a (data, split) choice reads: a folder's split files, a file whole, hub ids by split,
empty files refused, and training refusing to select checkpoints on its own training examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.evaluation import seeded_subset
from tests.conftest import EXAMPLES
from tests.tiny_task import make_tiny_task
from tw_env.tasks import Example, env_data_source, load_examples, resolve_data_source

EXPECTED = [Example(s, r) for s, r in EXAMPLES]
ROWS = [{"de": s, "en": r} for s, r in EXAMPLES]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def split_folder(tmp_path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", ROWS[:3])
    write_jsonl(tmp_path / "validation.jsonl", ROWS[3:])
    (tmp_path / "README.md").write_text("not data")
    return tmp_path


# ------------------------------------------------------------------------------------- splits
def test_a_folder_gives_each_split_its_own_file(split_folder):
    import datasets

    datasets.Dataset.from_list(ROWS[1:2]).to_parquet(str(split_folder / "test.parquet"))
    train = load_examples(str(split_folder), "de", "en", split="train")
    validation = load_examples(str(split_folder), "de", "en", split="validation")
    assert train == EXPECTED[:3]
    assert validation == EXPECTED[3:]
    assert not set(train) & set(validation)
    assert load_examples(str(split_folder), "de", "en", split="test") == EXPECTED[1:2]
    assert load_examples(str(split_folder), "de", "en") == EXPECTED[:3]  # the default split is train


def test_a_folder_without_the_split_names_the_folder_the_split_and_its_files(split_folder):
    with pytest.raises(FileNotFoundError) as err:
        load_examples(str(split_folder), "de", "en", split="test")
    message = str(err.value)
    assert f"'{split_folder}'" in message and "split 'test'" in message
    assert "test.jsonl, test.json or test.parquet" in message
    assert "['train.jsonl', 'validation.jsonl']" in message
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        resolve_data_source(str(split_folder), "test")


def test_a_folder_with_two_files_for_one_split_is_refused(split_folder):
    import datasets

    datasets.Dataset.from_list(ROWS).to_parquet(str(split_folder / "train.parquet"))
    with pytest.raises(ValueError, match=r"several files for the split 'train': \['train.jsonl', 'train.parquet'\]"):
        load_examples(str(split_folder), "de", "en", split="train")
    assert load_examples(str(split_folder), "de", "en", split="validation") == EXPECTED[3:]


def test_a_rows_corpus_field_is_kept_and_narrows_the_tracked_rules_prompts(tmp_path):
    from agents.train import call_rule_pool

    corpora = ["multi30k", "tatoeba", "multi30k", "tatoeba", "multi30k"]
    rows = [{**row, "corpus": c} for row, c in zip(ROWS, corpora, strict=True)]
    examples = load_examples(str(write_jsonl(tmp_path / "mixed.jsonl", rows)), "de", "en")
    assert [e.corpus for e in examples] == corpora
    assert [(e.source, e.reference) for e in examples] == [(e.source, e.reference) for e in EXPECTED]
    assert call_rule_pool(examples, ["multi30k"]).tolist() == [0, 2, 4]
    assert call_rule_pool(examples, ["tatoeba", "multi30k"]).tolist() == [0, 1, 2, 3, 4]
    assert call_rule_pool(examples, []).tolist() == [0, 1, 2, 3, 4]  # empty: every row
    with pytest.raises(ValueError, match=r"call_rule_corpora \['wmt'\] match no training row: expected names from "
                                         r"the data's 'corpus' field, which holds \['multi30k', 'tatoeba'\]"):
        call_rule_pool(examples, ["wmt"])
    with pytest.raises(ValueError, match="which holds nothing"):
        call_rule_pool(EXPECTED, ["multi30k"])  # rows without the field


def test_a_file_is_read_whole_whatever_the_split(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    assert load_examples(str(path), "de", "en", split="train") == EXPECTED
    assert load_examples(str(path), "de", "en", split="validation") == EXPECTED


def test_resolve_data_source(split_folder, tmp_path, monkeypatch):
    train, validation = resolve_data_source(str(split_folder), "train"), resolve_data_source(str(split_folder), "validation")
    assert train == str((split_folder / "train.jsonl").resolve())
    assert validation == str((split_folder / "validation.jsonl").resolve())
    # A file has no splits: every split reads it, and two spellings of one path are one source.
    file = split_folder / "train.jsonl"
    assert resolve_data_source(str(file), "validation") == train
    monkeypatch.chdir(split_folder)
    assert resolve_data_source("./train.jsonl", "test") == train
    assert resolve_data_source("EdinburghNLP/xsum", "train") == "hub:EdinburghNLP/xsum:train"
    assert resolve_data_source("wmt/wmt19", "validation", "de-en") == "hub:wmt/wmt19[de-en]:validation"
    with pytest.raises(FileNotFoundError, match="no file or folder at"):
        resolve_data_source(str(tmp_path / "missing.jsonl"), "train")


def test_env_data_source_reads_the_overrides_a_task_is_made_with(split_folder):
    folder = str(split_folder)
    assert env_data_source({"data": folder}) != env_data_source({"data": folder, "split": "validation"})
    assert env_data_source({"data": folder, "split": "validation"}) == str((split_folder / "validation.jsonl").resolve())
    file = str(split_folder / "train.jsonl")
    assert env_data_source({"data": file}) == env_data_source({"data": file, "split": "validation"})
    # Without data, the task's own data applies (hub dataset or embedded cache): one source per split.
    assert env_data_source({}) == env_data_source({"split": "train"}) != env_data_source({"split": "validation"})
    assert env_data_source({"data": "wmt/wmt19", "config": "de-en", "split": "test"}) == "hub:wmt/wmt19[de-en]:test"


# ------------------------------------------------------------------------------------- empty files
def _empty_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"de": pa.array([], pa.string()), "en": pa.array([], pa.string())}), path)


@pytest.mark.parametrize(
    "name, write",
    [
        ("empty.jsonl", lambda p: p.write_text("")),
        ("blank.jsonl", lambda p: p.write_text("\n  \n")),
        ("empty-list.json", lambda p: p.write_text("[]")),
        ("zero-bytes.parquet", lambda p: p.write_bytes(b"")),
        ("no-rows.parquet", _empty_parquet),
    ],
)
def test_an_empty_file_says_it_holds_no_rows(name, write, tmp_path):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=rf"the data file '.*{name}' holds no rows"):
        load_examples(str(path), "de", "en")


def test_an_empty_split_file_is_named(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    (tmp_path / "validation.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"'.*validation\.jsonl' holds no rows"):
        load_examples(str(tmp_path), "de", "en", split="validation")


# ------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("tiny"), n_train=24, n_validation=8)


def _config(tiny, out: Path, **overrides):
    from agents.train import TrainConfig

    values = dict(
        env_id="TrainingWheels-Synthetic-v0", env_kwargs=tiny.env_kwargs(), output_dir=str(out), max_new_tokens=4,
        num_envs=2, eval_examples=8, threads=1, device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize(
    "env_kwargs, eval_env_kwargs, eval_split",
    [
        ({"data": "TRAIN"}, {}, "validation"),  # one file has no splits
        ({"data": "FOLDER"}, {"data": "TRAIN"}, "validation"),  # the selection file is the training file
        ({"data": "FOLDER"}, {}, "train"),  # the folder's train file for both
    ],
)
def test_make_setup_refuses_selection_on_the_training_examples(tiny, tmp_path, env_kwargs, eval_env_kwargs, eval_split):
    from agents.train import make_setup

    names = {"TRAIN": str(tiny.train_file), "FOLDER": str(tiny.train_file.parent)}
    env = {**tiny.env_kwargs(), **{k: names[v] for k, v in env_kwargs.items()}}
    config = _config(tiny, tmp_path / "out", env_kwargs=env, eval_split=eval_split,
                     eval_env_kwargs={k: names[v] for k, v in eval_env_kwargs.items()})
    with pytest.raises(ValueError) as err:
        make_setup(config)
    message = str(err.value)
    assert "checkpoint selection would run on the training examples" in message
    assert str(tiny.train_file.resolve()) in message
    assert "eval_env_kwargs" in message and "validation.jsonl" in message
    assert "allow_selection_on_training_data" in message
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written


def test_make_setup_selects_on_the_validation_file_of_a_folder(tiny, tmp_path):
    from agents.train import make_setup

    setup = make_setup(_config(tiny, tmp_path))
    try:
        assert len(setup.train_examples) == 24 and len(setup.eval_examples) == 8
        assert not set(setup.train_examples) & set(setup.eval_examples)
        assert setup.eval_examples == load_examples(str(tiny.validation_file), "source", "target")
    finally:
        setup.writer.close()


def test_make_setup_allows_selection_on_training_data_when_asked_and_says_so(tiny, tmp_path, capsys):
    from agents.train import make_setup

    env = {**tiny.env_kwargs(), "data": str(tiny.train_file)}
    setup = make_setup(_config(tiny, tmp_path, env_kwargs=env, allow_selection_on_training_data=True))
    try:
        assert setup.eval_examples == seeded_subset(setup.train_examples, 8, setup.config.seed)
    finally:
        setup.writer.close()
    err = capsys.readouterr().err
    assert "WARNING: checkpoint selection would run on the training examples" in err
    assert str(tiny.train_file.resolve()) in err
