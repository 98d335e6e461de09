"""Shared fixtures of the environment tests: tiny random T5s, a word-level tokenizer, small task files.

Everything here is built in seconds, once per session, and needs nothing outside the repository.
Only the fixtures and tests about the real T5 tokenizer and data read ``../shared``; they skip
cleanly (``pytest.skip``) when it is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Nothing in these tests may reach a model or dataset hub: fail fast instead of retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Tiny models run fastest on one thread, and CI machines are small and shared.
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
T5_TOKENIZER = SHARED / "models/t5-tokenizer"

# The word-level tokenizer: special tokens first, then every word of the prompt templates, then
# content words. WhitespaceSplit keeps "use," and "English:" whole, so decoding reproduces a prompt.
SPECIALS = ["<pad>", "</s>", "<unk>"]
TEMPLATE_WORDS = [
    "With", "no", "light", "moderate-light", "moderate", "high", "very", "teacher", "use,",
    "translate", "Toy", "German", "to", "English:", "summarize:",
]
CONTENT_WORDS = [
    "der", "die", "das", "hund", "katze", "haus", "läuft", "schläft", "groß", "klein", "ist", "ein",
    "eine", "und", "nicht", "rot", "blau", "baum", "the", "a", "dog", "cat", "house", "runs", "sleeps",
    "big", "small", "is", "and", "not", "red", "blue", "tree", "very-long", "story", "about", "day",
    "night", "sun", "moon", "rain", ".",
]
WORDS = SPECIALS + TEMPLATE_WORDS + CONTENT_WORDS
WORD_VOCAB = len(WORDS)
WORD_MODEL_VOCAB = -(-WORD_VOCAB // 8) * 8  # the model's output layer, rounded up to a multiple of 8
INSTRUCTION = "translate Toy to English"

# (source, reference) pairs of the toy task; sources differ in length so that prompts need padding.
EXAMPLES = [
    ("der hund läuft", "the dog runs"),
    ("die katze schläft nicht und das haus ist groß", "the cat sleeps not and the house is big"),
    ("ein baum", "a tree"),
    ("das haus ist rot und der baum ist blau und die katze ist klein", "the house is red and the tree is blue and the cat is small"),
    ("der hund ist klein", "the dog is small"),
]


def tiny_t5_config(vocab_size: int, tied: bool = False):
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="relu" if tied else "gated-gelu", tie_word_embeddings=tied,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
    )


def save_tiny_t5(path: Path, vocab_size: int, tied: bool = False, seed: int = 0) -> Path:
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(tiny_t5_config(vocab_size, tied)).eval()
    if not tied:
        # Random T5 v1.1 weights give near one-hot distributions (other tokens around -20 nats); soften
        # them so that log-probs span roughly -0.2 to -8 and unclipped rewards are common.
        with torch.no_grad():
            model.decoder.final_layer_norm.weight.mul_(0.3)
    model.save_pretrained(path)
    return path


def pytest_runtest_setup(item):
    # Tests marked `shared` (see pyproject.toml) skip cleanly without ../shared, fixture or not.
    if item.get_closest_marker("shared") is not None and not T5_TOKENIZER.exists():
        pytest.skip(f"needs ../shared (the real T5 tokenizer at {T5_TOKENIZER})")


@pytest.fixture(scope="module", params=["encoder-decoder", "decoder-only"])
def family(request):
    """One model family (a :class:`tests.tiny_task.TinyFamily`: its tiny models, tiny task and
    full-forward references). A test that takes it is written once and runs for both families, with
    the ids ``[encoder-decoder]`` and ``[decoder-only]``; :func:`tests.tiny_task.only_family` limits a
    test to one."""
    from tests.tiny_task import FAMILIES

    return FAMILIES[request.param]


class TinyTasks:
    """The tiny task of each family, written once per session and shared by the modules."""

    def __init__(self, tmp_path_factory) -> None:
        self._factory = tmp_path_factory
        self._tasks: dict = {}

    def get(self, family, n_train: int = 200, n_validation: int = 40):
        key = (family.name, n_train, n_validation)
        if key not in self._tasks:
            self._tasks[key] = family.task(self._factory.mktemp(f"tiny-{family.name}"), n_train, n_validation)
        return self._tasks[key]


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory) -> TinyTasks:
    return TinyTasks(tmp_path_factory)


@pytest.fixture(scope="module")
def family_task(family, tiny_tasks):
    """The tiny task (tests/tiny_task.py) of the family: teacher, student, tokenizer and data on disk."""
    return tiny_tasks.get(family)


@pytest.fixture(scope="session")
def shared():
    """Skip the test cleanly when ../shared (the real tokenizer and data) is missing."""
    if not T5_TOKENIZER.exists():
        pytest.skip(f"needs the real T5 tokenizer at {T5_TOKENIZER}")
    return SHARED


@pytest.fixture(scope="session")
def t5_tokenizer_dir(shared) -> Path:
    return T5_TOKENIZER


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """T5 v1.1 layout (gated-gelu, no output rescaling), the real vocabulary size 32,128."""
    return save_tiny_t5(tmp_path_factory.mktemp("tiny_t5"), 32128, tied=False, seed=0)


@pytest.fixture(scope="session")
def tiny_t5_tied_dir(tmp_path_factory) -> Path:
    """The original T5 layout (relu, tied embeddings: decoder outputs rescaled by d_model^-0.5)."""
    return save_tiny_t5(tmp_path_factory.mktemp("tiny_t5_tied"), 32128, tied=True, seed=1)


@pytest.fixture(scope="session")
def mismatched_t5_dir(tmp_path_factory) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("tiny_t5_32000"), 32000, tied=False, seed=2)


@pytest.fixture(scope="session")
def word_tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level PreTrainedTokenizerFast (pad 0, eos 1, unk 2) that appends </s>; needs no ../shared."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    assert len(set(WORDS)) == len(WORDS)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    path = tmp_path_factory.mktemp("word_tokenizer")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def word_tokenizer(word_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(word_tokenizer_dir)


@pytest.fixture(scope="session")
def word_t5_dir(tmp_path_factory) -> Path:
    """A tiny T5 v1.1 whose output layer matches the word-level tokenizer (V = WORD_MODEL_VOCAB)."""
    return save_tiny_t5(tmp_path_factory.mktemp("word_t5"), WORD_MODEL_VOCAB, tied=False, seed=3)


@pytest.fixture(scope="session")
def word_t5_tied_dir(tmp_path_factory) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("word_t5_tied"), WORD_MODEL_VOCAB, tied=True, seed=4)


@pytest.fixture(scope="session")
def word_t5(word_t5_dir):
    from transformers import T5ForConditionalGeneration

    return T5ForConditionalGeneration.from_pretrained(word_t5_dir).eval()


@pytest.fixture(scope="session")
def examples() -> list[tuple[str, str]]:
    return list(EXAMPLES)


@pytest.fixture(scope="session")
def wmt_jsonl(tmp_path_factory) -> Path:
    """The toy pairs as a local WMT-style JSON-lines file (fields de/en)."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"de": s, "en": r}) + "\n" for s, r in EXAMPLES))
    return path


@pytest.fixture(scope="session")
def xsum_jsonl(tmp_path_factory) -> Path:
    """The toy pairs as a local XSum-style JSON-lines file (fields document/summary)."""
    path = tmp_path_factory.mktemp("data") / "xsum.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "document": s, "summary": r}) + "\n" for i, (s, r) in enumerate(EXAMPLES)))
    return path


@pytest.fixture(scope="session")
def wmt_parquet(tmp_path_factory) -> Path:
    import datasets

    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    datasets.Dataset.from_list([{"de": s, "en": r} for s, r in EXAMPLES]).to_parquet(str(path))
    return path


def make_env(teacher, tokenizer, **kwargs):
    """A single env on the toy task with short episodes."""
    from tw_env import TeacherAssistedDecodingEnv

    defaults = dict(
        examples=EXAMPLES, instruction=INSTRUCTION, max_new_tokens=8, max_prompt_length=32,
    )
    defaults.update(kwargs)
    return TeacherAssistedDecodingEnv(teacher=teacher, tokenizer=tokenizer, **defaults)
