"""Loading tasks, models and tokenizers from local files and directories (the hub is never reached)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import T5ForConditionalGeneration

from tests.conftest import EXAMPLES, WORD_VOCAB
from tw_env.models import (
    check_same_vocabulary,
    lm_head_logits,
    load_seq2seq,
    load_tokenizer,
    output_vocab_size,
    resolve_dtype,
)
from tw_env.tasks import Example, load_examples

EXPECTED = [Example(s, r) for s, r in EXAMPLES]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------- examples
def test_load_examples_jsonl(wmt_jsonl):
    assert load_examples(str(wmt_jsonl), "de", "en") == EXPECTED


def test_load_examples_parquet(wmt_parquet):
    assert load_examples(str(wmt_parquet), "de", "en") == EXPECTED


def test_load_examples_other_fields(xsum_jsonl):
    assert load_examples(str(xsum_jsonl), "document", "summary") == EXPECTED


def test_load_examples_folder_reads_every_file_in_name_order(tmp_path):
    rows = [{"de": s, "en": r} for s, r in EXAMPLES]
    write_jsonl(tmp_path / "b.jsonl", rows[3:])
    write_jsonl(tmp_path / "a.jsonl", rows[:3])
    (tmp_path / "README.md").write_text("not data")
    assert load_examples(str(tmp_path), "de", "en") == EXPECTED


def test_load_examples_nested_translation_fields_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "wmt.jsonl", [{"translation": {"de": s, "en": r}} for s, r in EXAMPLES])
    assert load_examples(str(path), "de", "en") == EXPECTED
    assert load_examples(str(path), "de", "en", limit=2) == EXPECTED[:2]
    assert load_examples(str(path), "de", "en", limit=100) == EXPECTED
    # the translation direction is chosen by the field names
    assert load_examples(str(path), "en", "de", limit=1) == [Example(EXAMPLES[0][1], EXAMPLES[0][0])]


def test_load_examples_missing_field_names_the_fields(wmt_jsonl):
    with pytest.raises(KeyError, match=r"no field 'document'.*'document' and 'summary'.*found \['de', 'en'\]"):
        load_examples(str(wmt_jsonl), "document", "summary")


def test_load_examples_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "pairs.jsonl"
    with pytest.raises(FileNotFoundError, match=r"no file or folder at '.*nowhere/pairs\.jsonl'"):
        load_examples(str(missing), "de", "en")
    with pytest.raises(FileNotFoundError, match="pairs.parquet"):
        load_examples("pairs.parquet", "de", "en")  # a relative file name that does not exist


def test_load_examples_bad_folder_and_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .jsonl/.json/.parquet files"):
        load_examples(str(tmp_path), "de", "en")
    text = tmp_path / "pairs.txt"
    text.write_text("der hund\tthe dog\n")
    with pytest.raises(ValueError, match=r"suffix '\.txt'"):
        load_examples(str(text), "de", "en")


# ------------------------------------------------------------------------------------- models
def test_load_seq2seq_and_tokenizer_from_local_dirs(tiny_t5_dir, word_tokenizer_dir):
    model = load_seq2seq(str(tiny_t5_dir), role="teacher")
    assert isinstance(model, T5ForConditionalGeneration)
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert output_vocab_size(model) == 32128
    assert load_seq2seq(str(tiny_t5_dir), dtype="bfloat16").dtype == torch.bfloat16
    assert load_seq2seq(model) is model  # a loaded model passes through
    tok = load_tokenizer(str(word_tokenizer_dir))
    assert len(tok) == WORD_VOCAB and tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert load_tokenizer(tok) is tok
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("float8")


def test_missing_model_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"teacher not found: no directory or file at '.*no-such-model'.*local directory"):
        load_seq2seq(str(missing), role="teacher")
    with pytest.raises(FileNotFoundError, match="tokenizer not found.*no-such-model"):
        load_tokenizer(str(missing))


def test_directory_without_weights_says_to_pass_a_local_directory(tiny_t5_dir, tmp_path):
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_t5_dir / "config.json").read_text())
    with pytest.raises(OSError, match=r"could not load the teacher '.*config-only'(.|\n)*pass the local directory"):
        load_seq2seq(str(no_weights), role="teacher")


def test_directory_without_a_model_says_to_pass_a_local_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match=r"could not load the student '.*empty'(.|\n)*pass the local directory"):
        load_seq2seq(str(empty), role="student")


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_lm_head_logits_equal_the_models_own_logits(which, tiny_t5_dir, tiny_t5_tied_dir):
    model = load_seq2seq(str(tiny_t5_dir if which == "untied" else tiny_t5_tied_dir))
    ids = torch.tensor([[5, 17, 300, 1], [9, 1, 0, 0]])
    mask = (torch.arange(4) < torch.tensor([[4], [2]])).long()
    dec = torch.tensor([[0, 4, 8], [0, 12, 3]])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        hidden = model.get_decoder()(
            input_ids=dec, encoder_hidden_states=full.encoder_last_hidden_state, encoder_attention_mask=mask
        ).last_hidden_state
        ours = lm_head_logits(model, hidden)
        unscaled = model.get_output_embeddings()(hidden)
    torch.testing.assert_close(ours, full.logits, atol=1e-5, rtol=1e-5)
    # the two layouts really differ: only the tied (original T5) one rescales by d_model^-0.5
    rescaled = torch.allclose(unscaled * model.config.d_model**-0.5, full.logits, atol=1e-5)
    assert rescaled == (which == "tied")


def test_check_same_vocabulary(tiny_t5_dir, mismatched_t5_dir):
    teacher = load_seq2seq(str(tiny_t5_dir))
    assert check_same_vocabulary(teacher, 32128) == 32128
    student = load_seq2seq(str(mismatched_t5_dir))
    with pytest.raises(ValueError, match=r"output layer has 32128 rows, the student has 32000"):
        check_same_vocabulary(teacher, output_vocab_size(student))


def test_hub_ids_fail_offline_with_a_hint_to_pass_local_files(tmp_path):
    """With the hub unreachable, hub ids fail fast with a message that says what to pass instead."""
    code = textwrap.dedent(
        """
        from tw_env.models import load_seq2seq
        from tw_env.tasks import load_examples
        for call in (lambda: load_seq2seq("google/flan-t5-small", role="student"),
                     lambda: load_examples("EdinburghNLP/xsum", "document", "summary", split="test")):
            try:
                call()
            except OSError as err:
                print("ERROR:", str(err).replace("\\n", " "))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in out.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 2, out.stdout + out.stderr
    assert "google/flan-t5-small" in errors[0] and "pass the local directory" in errors[0]
    assert "EdinburghNLP/xsum" in errors[1] and "pass a local JSON-lines or parquet file" in errors[1]
    assert "'document' and 'summary'" in errors[1]


# ------------------------------------------------------------------------------------- ../shared
@pytest.mark.shared
def test_real_t5_tokenizer(t5_tokenizer_dir):
    tok = load_tokenizer(str(t5_tokenizer_dir))
    assert len(tok) == 32100 and tok.eos_token_id == 1 and tok.pad_token_id == 0
    ids = tok("With light teacher use, summarize: a short text")["input_ids"]
    assert ids[-1] == 1


@pytest.mark.shared
def test_real_deen_validation(shared):
    path = shared / "data/deen/validation.jsonl"
    examples = load_examples(str(path), "de", "en", limit=5)
    assert len(examples) == 5
    with path.open() as f:
        first = json.loads(f.readline())
    assert examples[0] == Example(first["de"], first["en"])
    assert all(e.source and e.reference for e in examples)


@pytest.mark.shared
def test_real_xsum(shared):
    path = shared / "data/xsum/xsum.jsonl"
    examples = load_examples(str(path), "document", "summary", limit=3)
    with path.open() as f:
        first = json.loads(f.readline())
    assert examples[0] == Example(first["document"], first["summary"])
    assert len(examples) == 3 and all(len(e.source) > len(e.reference) for e in examples)
