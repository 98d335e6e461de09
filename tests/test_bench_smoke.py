"""Smoke tests of the speed benchmarks (`tw bench env`, `tw bench decode`, `tw bench-train`) on tiny random models.

Each benchmark runs end to end on models built from configs in a temporary folder (no download, no
training) and must return positive, finite figures and its ratios. Speed targets never live in
tests: the figures and the goals are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from scripts.bench_decode import BenchDecodeConfig
from scripts.bench_decode import run as run_decode
from scripts.bench_env import BenchEnvConfig
from scripts.bench_env import run as run_env


def _tiny_t5(vocab_size: int, d_model: int, seed: int):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_decoder_layers=1,
        num_heads=2, feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory) -> dict[str, str]:
    """A small synthetic language's tokenizer, a tiny random teacher and student, and a data file."""
    from tw_env.synthetic import SyntheticLanguage, build_tokenizer, padded_vocab_size

    root = tmp_path_factory.mktemp("bench")
    language = SyntheticLanguage(seed=0, n_topics=2, n_words=20, n_target_words=20, min_len=2, max_len=4)
    tokenizer = build_tokenizer(language)
    tokenizer.save_pretrained(root / "tokenizer")
    vocab = padded_vocab_size(tokenizer)
    _tiny_t5(vocab, 32, seed=0).save_pretrained(root / "teacher")
    _tiny_t5(vocab, 16, seed=1).save_pretrained(root / "student")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in language.sample(12, rng_seed=0)))
    return {
        "teacher": str(root / "teacher"), "student": str(root / "student"),
        "tokenizer": str(root / "tokenizer"), "data": str(data),
    }


def _positive_finite(values: dict) -> None:
    assert values, "no figures"
    for name, value in values.items():
        assert math.isfinite(value) and value > 0, f"{name} = {value}"


def test_bench_env_returns_figures_and_ratios(tiny_task, tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    result = run_env(BenchEnvConfig(
        env_kwargs=tiny_task, batch_size=3, new_tokens=4, prompt_length=24, repeats=2, output=str(out),
    ))
    assert set(result["tokens_per_s"]) == {"env", "teacher_generate", "rollout", "student_generate", "no_cache"}
    _positive_finite(result["tokens_per_s"])
    _positive_finite(result["ratios"])
    assert set(result["ratios"]) == {
        "env_vs_generate", "no_cache_vs_generate", "rollout_vs_generate", "rollout_vs_both_generate",
    }
    assert result["tokens_per_episode"] == 3 * 4
    assert result["models"].startswith("given models")
    assert json.loads(out.read_text())["ratios"] == pytest.approx(result["ratios"])


def test_bench_env_cli(tiny_task, capsys) -> None:
    """The command a user types: `tw bench env ...` (the variants that can be switched off are)."""
    from scripts.cli import main

    code = main([
        "bench", "env", "--env-kwargs", json.dumps(tiny_task), "--batch-size", "2", "--new-tokens", "3",
        "--repeats", "1", "--no-cache", "false", "--rollout", "false",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "env_vs_generate" in printed
    assert "no_cache_vs_generate" not in printed and "rollout_vs_generate" not in printed


def test_bench_decode_returns_figures_and_ratios(tiny_task) -> None:
    result = run_decode(BenchDecodeConfig(
        env_kwargs=tiny_task, call_rates=[0.0, 0.5], examples=2, batch_size=4, assisted_examples=1,
        new_tokens=5, prompt_length=24, repeats=1,
    ))
    methods = {"student", "teacher", "speculative", "tw@0", "tw@0.5"}
    assert set(result["latency_ms"]) == methods
    _positive_finite(result["latency_ms"])
    _positive_finite(result["output_tokens"])
    _positive_finite(result["latency_ratios"])
    _positive_finite(result["throughput_tokens_per_s"])
    _positive_finite(result["throughput_ratios"])
    assert set(result["throughput_ratios"]) == {
        "tw@0_vs_assisted", "tw@0.5_vs_assisted", "tw@0_vs_student_b1_bound", "tw@0.5_vs_student_b1_bound",
    }
    assert set(result["meets_throughput_goal"]) == {"tw@0_vs_assisted", "tw@0.5_vs_assisted"}
    assert result["batched_teacher_forwards_per_step"]["tw@0_batch"] == 0.0
    fractions = result["teacher_fraction"]
    assert fractions["student"] == 0.0 and fractions["teacher"] == 1.0 and fractions["tw@0"] == 0.0
    assert 0.0 <= fractions["tw@0.5"] <= 1.0


def test_bench_decode_with_a_saved_policy(tiny_task, tmp_path: Path) -> None:
    """`--policy DIR`: a StudentPolicy written by save() is measured at its own call rate."""
    from agents.policy import StudentPolicy
    from tw_env.models import load_model

    policy = StudentPolicy(load_model(tiny_task["student"]))
    with torch.no_grad():
        policy.call_head.bias.fill_(5.0)  # calls often
    policy.save(tmp_path / "policy")
    task = {k: v for k, v in tiny_task.items() if k != "student"}
    result = run_decode(BenchDecodeConfig(
        env_kwargs=task, policy=str(tmp_path / "policy"), examples=1, batch_size=2, assisted_examples=1,
        new_tokens=4, prompt_length=24, repeats=1,
    ))
    assert set(result["latency_ratios"]) == {"tw@trained"}
    _positive_finite(result["latency_ratios"])
    _positive_finite(result["throughput_ratios"])
    assert result["models"].endswith(f"trained policy {tmp_path / 'policy'}")


@pytest.fixture(scope="module")
def tiny_causal_task(tmp_path_factory) -> dict[str, str]:
    """The tiny causal pair (a Llama teacher, a Qwen2 student) with its tokenizer and a data file."""
    from tests.tiny_task import make_tiny_causal_task

    task = make_tiny_causal_task(tmp_path_factory.mktemp("bench_causal"), n_train=12, n_validation=4)
    return {"teacher": str(task.teacher_dir), "student": str(task.student_dir),
            "tokenizer": str(task.tokenizer_dir), "data": str(task.train_file)}


def test_bench_env_on_a_causal_pair(tiny_causal_task) -> None:
    result = run_env(BenchEnvConfig(
        models="embedded-causal", env_kwargs=tiny_causal_task, batch_size=3, new_tokens=4, prompt_length=24,
        repeats=1,
    ))
    assert result["env_id"] == "TrainingWheels-SyntheticCausal-v0"
    assert set(result["tokens_per_s"]) == {"env", "teacher_generate", "rollout", "student_generate", "no_cache"}
    _positive_finite(result["tokens_per_s"])
    _positive_finite(result["ratios"])


def test_no_cache_reference_decodes_as_generate_does(tiny_causal_task) -> None:
    """The causal no-cache reference (a full forward on the left-padded prefix every step) writes what
    generate writes with EOS forbidden: the benchmark times two ways of doing the same work."""
    from scripts.bench_env import _generate, _no_cache, make_vector_env, prepare_models, task_prompts

    bm = prepare_models("embedded-causal", tiny_causal_task, "cpu", "float32", new_tokens=5, prompt_length=24)
    envs = make_vector_env(bm, 3, {}, "cpu", "float32")
    ids, mask = task_prompts(envs, [0, 1, 2], 0.3)
    assert len(set(mask.sum(1).tolist())) > 1  # prompts of different lengths
    eos = int(bm.teacher.config.eos_token_id)
    want = _generate(bm.teacher, ids, mask, 5)[:, -5:]
    got = _no_cache(bm.teacher, ids, mask, 5, eos)[:, -5:]
    assert torch.equal(got, want)


def test_flan_t5_configs_are_the_published_sizes() -> None:
    from scripts.bench_env import MODEL_CHOICES, flan_t5_config

    # (d_model, d_ff, heads, layers) of google/flan-t5-small, -base and -xl's config.json.
    for size, expected in (("small", (512, 1024, 6, 8)), ("base", (768, 2048, 12, 12)), ("xl", (2048, 5120, 32, 24))):
        c = flan_t5_config(size)
        assert (c.d_model, c.d_ff, c.num_heads, c.num_layers, c.num_decoder_layers) == (*expected, expected[3])
        # T5 v1.1: no d_model**-0.5 scaling of the decoder output (transformers 5 always ties lm_head
        # to the shared embedding; tie_word_embeddings=False now only turns that scaling off).
        assert (c.d_kv, c.vocab_size, c.feed_forward_proj, c.scale_decoder_outputs) == (64, 32128, "gated-gelu", False)
    assert "flan-t5-base-random" in MODEL_CHOICES


BENCH_TRAIN_PAIRS = {"encoder-decoder": "embedded", "decoder-only": "embedded-causal"}  # the pair whose configs a family's tiny task stands in for


def test_bench_train_prints_step_over_floor_ratios_last(family, family_task, capsys) -> None:
    """`tw bench-train` on the tiny task of each family: a BC, a PCL and a GKD batch each against its
    floor; the last line printed is the JSON of the ratios step ÷ floor."""
    from scripts.cli import main

    pair = BENCH_TRAIN_PAIRS[family.name]
    code = main([
        "bench-train", "--models", json.dumps([pair]), "--env-kwargs", json.dumps(family_task.env_kwargs()),
        "--repeats", "1", "--bc-batch-size", "4", "--num-envs", "4", "--replay-per-update", "4",
        "--gkd-batch-size", "4", "--max-new-tokens", "5", "--threads", "1",
    ])
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    ratios = json.loads(printed[-1])
    assert set(ratios) == {pair} and set(ratios[pair]) == {"bc", "pcl", "gkd"}
    _positive_finite(ratios[pair])
    assert sum("step breakdown" in line for line in printed) == 3


def test_the_probe_records_calls_times_stages_and_restores_what_it_wrapped() -> None:
    """The bench's wrappers: calls of "record" targets kept with their arguments, exclusive time charged
    to (stage, innermost kind), and every wrapped attribute given back."""
    from scripts.bench_train import Probe, Target

    class Box:
        def outer(self, x: int) -> int:
            time.sleep(0.02)
            return self.inner(x) + 1

        def inner(self, x: int) -> int:
            time.sleep(0.01)
            return 2 * x

    box, probe = Box(), Probe(torch.device("cpu"))
    targets = [Target(box, "outer", "outer", "record"), Target(box, "inner", "inner", "kind")]
    with probe.installed(targets, timing=False):
        assert box.outer(3) == 7 and "inner" not in vars(box)  # kinds are wrapped for the breakdown only
    assert probe.last("outer").arguments == {"x": 3} and probe.last("outer").result == 7
    with probe.installed(targets, timing=True):
        table = probe.breakdown(lambda: box.outer(1), "(root)")
    assert vars(box) == {}
    assert set(table) == {"outer", "(root)"} and set(table["outer"]) == {"inner", "other"}
    assert 0.01 <= table["outer"]["inner"] < table["outer"]["other"] + table["outer"]["inner"]
    assert table["outer"]["other"] >= 0.02
