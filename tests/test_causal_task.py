"""Tasks for decoder-only pairs: prompt formats (text, plain, chat template), the registered ids with a
causal pair, and the embedded causal task TrainingWheels-SyntheticCausal-v0 (its cache and its models).

The prompt formats run on the synthetic language's real word-level tokenizer; a chat template is set on
it (a Jinja string, as a hub tokenizer carries one) so that the chat path is the real
``apply_chat_template``. The embedded task's cache is built with a few training steps, as
tests/test_synthetic.py does for the T5 one; the real models are checked in a slow test.
"""

from __future__ import annotations

import dataclasses
import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import tw_env  # noqa: F401  (registers the tasks)
import tw_env.synthetic as syn
from tests.tiny_task import make_tiny_causal_task, make_tiny_task
from tw_env.families import DECODER_ONLY, ENCODER_DECODER
from tw_env.prompts import PromptFormat, make_prompt, resolve_prompt_format
from tw_env.registration import SYNTHETIC_CAUSAL_ID, make_task

WMT19_ID = "TrainingWheels-WMT19-v0"
# A chat template in the style of a hub tokenizer's, written with words the synthetic tokenizer knows:
# the user turn opens with "teacher", the generation prompt is "use".
CHAT_TEMPLATE = (
    "{% for message in messages %}teacher {{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} use{% endif %}"
)


@pytest.fixture(scope="module")
def causal_task(tmp_path_factory):
    return make_tiny_causal_task(tmp_path_factory.mktemp("causal_task"))


@pytest.fixture(scope="module")
def t5_task(tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("t5_task"))


@pytest.fixture
def tokenizer(causal_task):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(causal_task.tokenizer_dir)


@pytest.fixture
def chat_tokenizer(causal_task):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(causal_task.tokenizer_dir)
    loaded.chat_template = CHAT_TEMPLATE
    return loaded


def words(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------- prompt formats
def test_text_format_is_the_tokenizers_encoding(tokenizer):
    text = make_prompt("translate Synthetic to English", "zonu botivu", 0.1)
    assert PromptFormat("text").encode(tokenizer, text, 64) == tokenizer(text)["input_ids"]
    assert PromptFormat("text").encode(tokenizer, text, 4) == tokenizer(text)["input_ids"][:3] + [tokenizer.eos_token_id]


def test_chat_format_wraps_the_prompt_in_the_template_with_the_generation_prompt(chat_tokenizer):
    text = make_prompt("translate Synthetic to English", "zonu botivu", 0.1)
    ids = PromptFormat("chat").encode(chat_tokenizer, text, 64)
    # The template's words around the prompt's, and no special token added by the tokenizer (no EOS).
    assert ids == words(chat_tokenizer, "teacher") + words(chat_tokenizer, text) + words(chat_tokenizer, "use")
    rendered = chat_tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)
    assert chat_tokenizer.decode(ids) == rendered


def test_a_long_prompt_loses_the_end_of_its_text_never_the_wrapping(chat_tokenizer):
    text = make_prompt("translate Synthetic to English", "zonu botivu", 0.5)
    full = PromptFormat("chat").encode(chat_tokenizer, text, 64)
    for max_length in (len(full) - 1, len(full) - 4, 3):
        ids = PromptFormat("chat").encode(chat_tokenizer, text, max_length)
        assert len(ids) == max_length
        assert ids[0] == full[0] and ids[-1] == full[-1]  # "teacher" … "use" kept
        assert ids[1:-1] == words(chat_tokenizer, text)[: max_length - 2]  # the text's beginning
    with pytest.raises(ValueError, match="too short for the 'chat' prompt format"):
        PromptFormat("chat").encode(chat_tokenizer, text, 2)


def test_plain_format_appends_a_newline():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A tokenizer that keeps the newline as a token (the word-level synthetic one folds white space).
    word_level = Tokenizer(models.WordLevel({"With": 0, "no": 1, "\n": 2, "<unk>": 3}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split(Regex("\n"), behavior="isolated")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>")
    assert PromptFormat("plain").encode(tokenizer, "With no", 16) == [0, 1, 2]
    assert PromptFormat("text").encode(tokenizer, "With no", 16) == [0, 1]
    assert PromptFormat("plain").encode(tokenizer, "With no", 2) == [0, 2]  # the text is cut, not the newline


def test_the_default_format_follows_the_family_and_the_switch(tokenizer, chat_tokenizer):
    assert resolve_prompt_format(None, family=ENCODER_DECODER, tokenizer=chat_tokenizer).kind == "text"
    assert resolve_prompt_format(None, family=DECODER_ONLY, tokenizer=chat_tokenizer).kind == "chat"
    assert resolve_prompt_format(None, family=DECODER_ONLY, tokenizer=chat_tokenizer, chat_template=False).kind == "plain"
    assert resolve_prompt_format(None, family=DECODER_ONLY, tokenizer=tokenizer).kind == "plain"  # no template
    assert resolve_prompt_format("text", family=DECODER_ONLY, tokenizer=chat_tokenizer).kind == "text"


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_format="chatml"), "prompt format must be one of"),
    (dict(prompt_format="chat"), "needs a tokenizer with a chat template"),
    (dict(chat_template=True), "the tokenizer has no chat template"),
])
def test_bad_prompt_format_choices_are_refused(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_prompt_format(kwargs.get("prompt_format"), family=DECODER_ONLY, tokenizer=tokenizer,
                              chat_template=kwargs.get("chat_template"))


def test_contradicting_format_and_switch_are_refused(chat_tokenizer):
    with pytest.raises(ValueError, match="contradicts chat_template=True"):
        resolve_prompt_format("plain", family=DECODER_ONLY, tokenizer=chat_tokenizer, chat_template=True)


# ------------------------------------------------------------------------------------- registered ids
def test_wmt19_with_a_causal_pair_reads_prompts_through_the_chat_template(causal_task, chat_tokenizer):
    kwargs = dict(teacher=str(causal_task.teacher_dir), student=str(causal_task.student_dir),
                  tokenizer=chat_tokenizer, data=str(causal_task.train_file), source_field="source",
                  reference_field="target")
    task = make_task(WMT19_ID, **kwargs)
    assert task.family is DECODER_ONLY and task.prompt_format.kind == "chat"
    source = task.examples[0].source
    want = PromptFormat("chat").encode(chat_tokenizer, make_prompt(task.instruction, source, 0.2), task.max_prompt_length)
    assert task.encode_prompt(source, 0.2) == want
    # Batched prompts, the teacher's prompt and the plain (GKD, baselines) prompt use the same format.
    ids, mask = task.prompts([source], [0.2])
    assert ids[0, : int(mask[0].sum())].tolist() == want
    teacher_ids = task.encode_teacher_prompt(source, 0.2)
    assert teacher_ids[0] == want[0] and teacher_ids[-1] == want[-1] and len(teacher_ids) < len(want)

    env = gym.make(WMT19_ID, disable_env_checker=True, **kwargs).unwrapped
    obs, info = env.reset(seed=0, options={"budget": 0.2})
    source = env.task.examples[info["example_index"]].source
    assert obs["prompt_ids"][: int(obs["prompt_length"][0])].tolist() == env.task.encode_prompt(source, 0.2)

    plain = make_task(WMT19_ID, chat_template=False, **kwargs)
    assert plain.prompt_format.kind == "plain"


def test_bad_prompt_format_is_refused_before_loading(causal_task, monkeypatch):
    import tw_env.task

    def no_loading(*args, **kwargs):
        raise AssertionError("nothing may be loaded for a bad prompt format")

    monkeypatch.setattr(tw_env.task, "load_model", no_loading)
    with pytest.raises(ValueError, match="prompt format must be one of"):
        make_task(WMT19_ID, teacher=str(causal_task.teacher_dir), tokenizer=str(causal_task.tokenizer_dir),
                  data=str(causal_task.train_file), source_field="source", reference_field="target",
                  prompt_format="chatml")


def test_t5_pair_keeps_the_text_format(t5_task):
    task = make_task(WMT19_ID, teacher=str(t5_task.teacher_dir), student=str(t5_task.student_dir),
                     tokenizer=str(t5_task.tokenizer_dir), data=str(t5_task.train_file), source_field="source",
                     reference_field="target")
    assert task.prompt_format.kind == "text"
    text = make_prompt(task.instruction, task.examples[0].source, 0.0)
    assert task.encode_prompt(task.examples[0].source, 0.0) == task.tokenizer(text)["input_ids"]


# ------------------------------------------------------------------------------------- the embedded causal task
@pytest.fixture
def tiny_causal_specs(monkeypatch):
    """Train for a handful of steps only, so the cache mechanics can be tested in seconds."""
    monkeypatch.setattr(syn, "CAUSAL_TEACHER_SPEC", dataclasses.replace(syn.CAUSAL_TEACHER_SPEC, steps=3, warmup=1))
    monkeypatch.setattr(syn, "CAUSAL_STUDENT_SPEC", dataclasses.replace(syn.CAUSAL_STUDENT_SPEC, steps=3, warmup=1))


def test_causal_cache_is_a_llama_pair_beside_the_t5_one(tiny_causal_specs, tmp_path, capsys):
    assets = syn.ensure_synthetic_models(tmp_path, seed=0, causal=True)
    assert assets.root == tmp_path / f"synthetic-causal-{syn.CAUSAL_FORMAT_VERSION}-seed0"
    assert capsys.readouterr().err.splitlines()[0] == (
        "Training the embedded SyntheticCausal teacher and student (first use, about 4 minutes on 2 CPU cores); "
        f"cached in {assets.root}")
    configs = [json.loads((d / "config.json").read_text()) for d in (assets.teacher_dir, assets.student_dir)]
    assert [c["model_type"] for c in configs] == ["llama", "llama"]
    assert configs[0]["vocab_size"] == configs[1]["vocab_size"]
    assert configs[0]["hidden_size"] > configs[1]["hidden_size"]
    assert [p.name for p in tmp_path.iterdir()] == [assets.root.name]  # no temporary leftovers
    # The same language, splits and tokenizer as the T5 task.
    assert syn.load_split(assets.data_dir, "test") == syn.SyntheticLanguage(seed=0).splits(seed=0)["test"]
    meta = json.loads((assets.root / "COMPLETE.json").read_text())
    assert meta["teacher"]["architecture"] == "llama" and meta["teacher"]["steps"] == 3


def test_causal_training_batch_is_prompt_then_target_with_loss_on_the_target(causal_task):
    """causal_batch: one sequence per pair, the loss equals a hand computation over the target tokens only."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(causal_task.tokenizer_dir)
    rows = syn.SyntheticLanguage(seed=0, n_words=60, n_target_words=60).sample(3, rng_seed=5)
    encoder = syn._BatchEncoder(tokenizer, rows)
    input_ids, mask, labels = encoder.causal_batch([0, 1, 2], [0.0, 0.3, 0.5])
    model = tw_env.models.load_model(str(causal_task.teacher_dir))
    total, count = 0.0, 0
    for i, (row, budget) in enumerate(zip(rows, (0.0, 0.3, 0.5), strict=True)):
        prompt = tokenizer(make_prompt(syn.SYNTHETIC_INSTRUCTION, row["source"], budget))["input_ids"]
        target = tokenizer(row["target"])["input_ids"]
        n = len(prompt) + len(target)
        assert input_ids[i, :n].tolist() == prompt + target and mask[i].sum() == n
        assert labels[i, : len(prompt)].eq(-100).all() and labels[i, len(prompt) : n].tolist() == target
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([prompt + target])).logits[0].log_softmax(-1)
        for k, token in enumerate(target):  # position len(prompt)+k-1 predicts target[k]
            total -= float(logp[len(prompt) + k - 1, token])
            count += 1
    with torch.no_grad():
        loss = float(model(input_ids=input_ids, attention_mask=mask, labels=labels).loss)
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_gym_make_the_causal_embedded_task(tiny_causal_specs, tmp_path):
    env = gym.make(SYNTHETIC_CAUSAL_ID, cache_dir=str(tmp_path), disable_env_checker=True).unwrapped
    assert env.task.family is DECODER_ONLY and env.task.prompt_format.kind == "text"
    assert env.task.teacher.config.model_type == "llama"
    assert isinstance(env.task.student, str) and "synthetic-causal" in env.task.student
    obs, _ = env.reset(seed=0, options={"budget": 0.3})
    prompt = obs["prompt_ids"][: int(obs["prompt_length"][0])].tolist()
    assert prompt[-1] == env.task.eos_token_id  # the prompt ends in EOS, as the models were trained
    _, reward, _, _, info = env.step(env.task.vocab_size)  # <τ>: the teacher writes the token
    assert np.isfinite(reward) and info["teacher_call"]
    vec = gym.make_vec(SYNTHETIC_CAUSAL_ID, num_envs=2, vectorization_mode="vector_entry_point", cache_dir=str(tmp_path))
    obs, _ = vec.reset(seed=0)
    assert obs["prompt_ids"].shape[0] == 2


@pytest.mark.slow
def test_causal_teacher_clearly_beats_student(tmp_path):
    assets = syn.ensure_synthetic_models(tmp_path, seed=0, causal=True)
    validation = syn.load_split(assets.data_dir, "validation")[:500]
    teacher = syn.evaluate_bleu(assets.teacher_dir, assets.tokenizer_dir, validation)
    student = syn.evaluate_bleu(assets.student_dir, assets.tokenizer_dir, validation)
    assert teacher >= student + 15, (teacher, student)
    assert teacher >= 50, teacher
