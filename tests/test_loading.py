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
    load_model,
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


def test_load_examples_folder_reads_the_split_file(tmp_path):
    # (more in tests/test_data_splits.py: a folder holds one file per split, other files are not read)
    rows = [{"de": s, "en": r} for s, r in EXAMPLES]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "other.jsonl", rows[:1])
    (tmp_path / "README.md").write_text("not data")
    assert load_examples(str(tmp_path), "de", "en") == EXPECTED
    assert load_examples(str(tmp_path), "de", "en", split="other") == EXPECTED[:1]


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
def test_load_model_and_tokenizer_from_local_dirs(tiny_t5_dir, word_tokenizer_dir):
    model = load_model(str(tiny_t5_dir), role="teacher")
    assert isinstance(model, T5ForConditionalGeneration)
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert output_vocab_size(model) == 32128
    assert load_model(str(tiny_t5_dir), dtype="bfloat16").dtype == torch.bfloat16
    assert load_model(model) is model  # a loaded model passes through
    tok = load_tokenizer(str(word_tokenizer_dir))
    assert len(tok) == WORD_VOCAB and tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert load_tokenizer(tok) is tok
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("float8")


def test_missing_model_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"teacher not found: no directory or file at '.*no-such-model'.*local directory"):
        load_model(str(missing), role="teacher")
    with pytest.raises(FileNotFoundError, match="tokenizer not found.*no-such-model"):
        load_tokenizer(str(missing))


def test_directory_without_weights_says_to_pass_a_local_directory(tiny_t5_dir, tmp_path):
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_t5_dir / "config.json").read_text())
    with pytest.raises(OSError, match=r"could not load the teacher '.*config-only'(.|\n)*pass the local directory"):
        load_model(str(no_weights), role="teacher")


def test_directory_without_a_model_says_to_pass_a_local_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match=r"could not load the student '.*empty'(.|\n)*pass the local directory"):
        load_model(str(empty), role="student")


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_lm_head_logits_equal_the_models_own_logits(which, tiny_t5_dir, tiny_t5_tied_dir):
    model = load_model(str(tiny_t5_dir if which == "untied" else tiny_t5_tied_dir))
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
    teacher = load_model(str(tiny_t5_dir))
    assert check_same_vocabulary(teacher, 32128) == 32128
    student = load_model(str(mismatched_t5_dir))
    with pytest.raises(ValueError, match=r"output layer has 32128 rows, the student has 32000"):
        check_same_vocabulary(teacher, output_vocab_size(student))


def test_hub_ids_fail_offline_with_a_hint_to_pass_local_files(tmp_path):
    """With the hub unreachable, hub ids fail fast with a message that says what to pass instead."""
    code = textwrap.dedent(
        """
        from tw_env.models import load_model
        from tw_env.tasks import load_examples
        for call in (lambda: load_model("google/flan-t5-small", role="student"),
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


# ------------------------------------------------------------------------------------- hub unavailable
NO_MODEL = "tw-tests-nobody/no-such-model"  # well-formed hub ids that are in no cache
NO_DATA = "tw-tests-nobody/no-such-data"


@pytest.fixture
def loaders_unreached(monkeypatch):
    """The real hub loaders, replaced to record their calls (and to fail should one be reached)."""
    import datasets
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    calls = []

    def record(name):
        def loader(*args, **kwargs):
            calls.append((name, args, kwargs))
            raise OSError(f"{name} reached")

        return loader

    # A model's config is read first (it names the model family), so it is the model's first hub call.
    monkeypatch.setattr(AutoConfig, "from_pretrained", record("model"))
    monkeypatch.setattr(AutoModelForSeq2SeqLM, "from_pretrained", record("model"))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", record("tokenizer"))
    monkeypatch.setattr(datasets, "load_dataset", record("dataset"))
    return calls


@pytest.fixture
def hub_online(monkeypatch):
    """Offline mode off (the test session turns it on); the probe is what each test says."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")


def _fails_at_once(call) -> str:
    import time

    t0 = time.perf_counter()
    with pytest.raises(OSError) as err:
        call()
    assert time.perf_counter() - t0 < 1.0
    return str(err.value)


def test_hub_ids_fail_at_once_when_offline(monkeypatch, loaders_unreached):
    import tw_env.models as models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(models, "_can_connect", lambda host, port: pytest.fail("probed while offline"))
    for call, role in ((lambda: load_model(NO_MODEL, role="teacher"), "teacher"),
                       (lambda: load_tokenizer(NO_MODEL), "tokenizer")):
        message = _fails_at_once(call)
        assert f"cannot load the {role} '{NO_MODEL}'" in message
        assert "Hugging Face Hub is offline (HF_HUB_OFFLINE is set)" in message
        assert "pass the local directory instead" in message and f"{role}='DIR'" in message
    message = _fails_at_once(lambda: load_examples(NO_DATA, "document", "summary", split="test"))
    assert f"cannot load the dataset '{NO_DATA}'" in message and "split='test'" in message
    assert "Hugging Face Hub is offline (HF_HUB_OFFLINE and HF_DATASETS_OFFLINE are set)" in message
    assert "pass a local JSON-lines or parquet file with the fields 'document' and 'summary'" in message
    assert loaders_unreached == []


def test_hub_ids_fail_at_once_when_the_hub_does_not_answer(monkeypatch, hub_online, loaders_unreached):
    import gymnasium as gym

    import tw_env  # noqa: F401  (registers the tasks)
    import tw_env.models as models

    probes = []
    monkeypatch.setattr(models, "_can_connect", lambda host, port: probes.append((host, port)) or False)
    message = _fails_at_once(lambda: load_model(NO_MODEL, role="student"))
    assert f"cannot load the student '{NO_MODEL}'" in message
    assert "Hugging Face Hub is unreachable (https://huggingface.co, huggingface.co:443, did not answer within 3 s)" in message
    assert "pass the local directory instead" in message
    # gym.make of a hub task with its default data: the dataset id, at once, no retries.
    message = _fails_at_once(lambda: gym.make("TrainingWheels-XSum-v0"))
    assert "cannot load the dataset 'EdinburghNLP/xsum'" in message and "unreachable" in message
    assert "pass a local JSON-lines or parquet file" in message
    assert probes and set(probes) == {("huggingface.co", 443)}
    assert loaders_unreached == []


def test_a_reachable_hub_keeps_the_real_loaders(monkeypatch, hub_online, loaders_unreached):
    import tw_env.models as models

    monkeypatch.setattr(models, "_can_connect", lambda host, port: True)
    with pytest.raises(OSError, match=f"could not load the teacher '{NO_MODEL}': model reached"):
        load_model(NO_MODEL, role="teacher")
    with pytest.raises(OSError, match=f"could not load the dataset '{NO_DATA}'.*dataset reached"):
        load_examples(NO_DATA, "de", "en", split="validation", config="de-en")
    (_, model_args, model_kwargs), (_, data_args, data_kwargs) = loaders_unreached
    assert model_args == (NO_MODEL,) and "local_files_only" not in model_kwargs
    assert data_args == (NO_DATA, "de-en") and data_kwargs == {"split": "validation"}


def test_a_cached_hub_id_loads_from_the_cache_without_the_hub(monkeypatch, loaders_unreached):
    import tw_env.models as models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "in_hub_cache", lambda *args, **kwargs: True)
    with pytest.raises(OSError, match="model reached"):
        load_model(NO_MODEL)
    with pytest.raises(OSError, match="tokenizer reached"):
        load_tokenizer(NO_MODEL)
    assert [(name, kwargs["local_files_only"]) for name, _, kwargs in loaders_unreached] == [
        ("model", True), ("tokenizer", True)
    ]


def test_a_cached_hub_dataset_goes_to_datasets_when_offline(monkeypatch, tmp_path, loaders_unreached):
    from datasets import config as datasets_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(OSError, match="not in the local datasets cache"):
        load_examples(NO_DATA, "de", "en")
    # a prepared copy, where datasets looks for one offline: NAMESPACE___NAME/CONFIG/VERSION/HASH
    (tmp_path / "tw-tests-nobody___no-such-data" / "default" / "0.0.0" / "abc123").mkdir(parents=True)
    with pytest.raises(OSError, match="dataset reached"):
        load_examples(NO_DATA, "de", "en")
    assert [(name, args) for name, args, _ in loaders_unreached] == [("dataset", (NO_DATA, None))]


def test_the_hub_probe_connects_once_to_the_endpoint_or_its_proxy(monkeypatch):
    import socket

    from huggingface_hub import constants

    import tw_env.models as models

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example.org:8443")
    connects = []

    def refuse(address, timeout):
        connects.append((address, timeout))
        raise ConnectionRefusedError(address)

    monkeypatch.setattr(socket, "create_connection", refuse)
    models._can_connect.cache_clear()
    try:
        assert models.hub_reachable() is False and models.hub_reachable() is False
        assert connects == [(("hub.example.org", 8443), 3.0)]  # probed once per process
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.org:3128")
        assert models.hub_reachable() is False
        assert connects[-1] == (("proxy.example.org", 3128), 3.0)
    finally:
        models._can_connect.cache_clear()


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
    assert examples[0] == Example(first["de"], first["en"], first.get("corpus", ""))  # the corpus field is kept
    assert all(e.source and e.reference for e in examples)


@pytest.mark.shared
def test_real_xsum(shared):
    path = shared / "data/xsum/xsum.jsonl"
    examples = load_examples(str(path), "document", "summary", limit=3)
    with path.open() as f:
        first = json.loads(f.readline())
    assert examples[0] == Example(first["document"], first["summary"])
    assert len(examples) == 3 and all(len(e.source) > len(e.reference) for e in examples)


# ---------------------------------------------------------------------------------------------- a teacher over several devices
def test_a_teacher_loaded_with_a_device_map_steps_the_env_like_one_on_its_device(tmp_path):
    """``teacher_device_map`` (transformers' big-model loading through Accelerate). With no GPU here the
    map puts the decoder's blocks on "disk" (offloaded, loaded by Accelerate's hooks as it runs) and the rest on
    the CPU: the model is really dispatched, and the env, which calls the decoder directly, must see
    exactly the rewards of the teacher loaded whole."""
    import numpy as np

    from tests.tiny_task import make_tiny_task
    from tw_env.env import TeacherAssistedDecodingEnv
    from tw_env.registration import make_task

    tiny = make_tiny_task(tmp_path, n_train=8, n_validation=4)
    plain = make_task("TrainingWheels-Synthetic-v0", **tiny.env_kwargs(), max_new_tokens=5)
    device_map = {"shared": "cpu", "encoder": "cpu", "decoder.embed_tokens": "cpu", "decoder.block": "disk",
                  "decoder.final_layer_norm": "cpu", "lm_head": "cpu"}
    mapped = make_task("TrainingWheels-Synthetic-v0", **tiny.env_kwargs(), max_new_tokens=5,
                       teacher_device_map=device_map, teacher_offload_folder=str(tmp_path / "offload"))
    assert mapped.teacher.hf_device_map == device_map  # dispatched by Accelerate, not moved afterwards
    # The decoder's weights are not in memory (meta tensors): its hook brings them in for each forward.
    assert hasattr(mapped.teacher.decoder.block[0], "_hf_hook")
    assert next(mapped.teacher.decoder.block.parameters()).device.type == "meta"
    rewards = []
    for task in (plain, mapped):
        env = TeacherAssistedDecodingEnv(task)
        env.reset(seed=0, options={"budget": 0.3, "index": 1})
        steps = [env.step(a) for a in (5, env.unwrapped.teacher_action, 7)]
        rewards.append(np.array([[reward, info["teacher_logprob"]] for _, reward, _, _, info in steps]))
    np.testing.assert_array_equal(rewards[0], rewards[1])


def test_a_bad_device_map_is_refused_before_loading(tmp_path):
    from tests.tiny_task import make_tiny_task
    from tw_env.models import load_model

    tiny = make_tiny_task(tmp_path, n_train=8, n_validation=4)
    with pytest.raises(ValueError, match=r"teacher_device_map must be one of \['auto', 'balanced'.*got 'everywhere'"):
        load_model(str(tiny.teacher_dir), role="teacher", device_map="everywhere")
    loaded = load_model(str(tiny.teacher_dir), role="teacher")
    with pytest.raises(ValueError, match="device_map applies when the teacher is loaded"):
        load_model(loaded, role="teacher", device_map="auto")
