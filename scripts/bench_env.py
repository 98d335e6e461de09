"""`tw bench-env`: vector-env steps per second against the teacher's own ``generate``.

What is compared (every figure is output tokens per second, B rows × N tokens per episode):

- **env**: :class:`~tw_env.TeacherAssistedDecodingVectorEnv` stepped for one episode of exactly N
  steps (the student action is a fixed non-EOS token, so no row ends early); one batched teacher
  decoder forward per step with KV caches, the encoder once per episode, plus everything the env
  does per step (the Eq. 17 reward, observations, infos).
- **teacher_generate**: ``teacher.generate`` on the same prompts, greedy, exactly N new tokens
  (``min_new_tokens = max_new_tokens = N``).
- **no_cache**: the reference of RL4LMs-style trainers: the teacher's full forward (encoder and
  decoder) re-run on the whole prefix at every step.
- **rollout**: a full on-policy rollout step, what phase-2 training pays: the incremental student
  (:class:`~agents.policy.PolicyRollout`) gives π over V+1, an action is sampled (EOS masked, and <τ>
  masked where the teacher's token would be EOS, so the episode keeps its length), and the env steps.
- **student_generate**: ``student.generate`` the same way, for context: a rollout cannot be cheaper
  than the student and the teacher each decoding once, so ``rollout_vs_both_generate`` =
  (teacher + student generate time) / rollout time is the rollout's own efficiency.

Variants are interleaved (A B C A B C ...) after one warm-up each, and medians are reported.
Goals (the issue): env / teacher_generate ≥ 0.8 on CPU with the embedded models at batch 32, ≥ 0.9 on
a GPU with FLAN-T5-small/XL-size random models at batch 64. See ``docs/benchmarks.md``.

This module also holds what ``scripts/bench_decode.py`` shares: model preparation and machine info.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tw_env.atomic import write_json

SHARED = Path(__file__).resolve().parents[2] / "shared"
T5_TOKENIZER_DIR = SHARED / "models" / "t5-tokenizer"
XSUM_JSONL = SHARED / "data" / "xsum" / "xsum.jsonl"
SYNTHETIC_ID = "TrainingWheels-Synthetic-v0"
SYNTHETIC_CAUSAL_ID = "TrainingWheels-SyntheticCausal-v0"
XSUM_ID = "TrainingWheels-XSum-v0"
MODEL_CHOICES = ("embedded", "embedded-causal", "flan-t5-random", "flan-t5-base-random", "qwen3-random")
ENV_GOALS = {"cpu": 0.8, "cuda": 0.9}  # env / teacher_generate, from the issue
_OVERRIDES = ("teacher", "student", "tokenizer", "data")

# FLAN-T5's public configurations (T5 v1.1: gated-gelu, no output scaling, d_kv 64, vocabulary 32,128;
# transformers 5 ties T5's lm_head to the shared embedding whatever the config says, same compute).
FLAN_T5_CONFIGS = {
    "small": dict(d_model=512, d_ff=1024, num_heads=6, num_layers=8, num_decoder_layers=8),
    "base": dict(d_model=768, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12),
    "xl": dict(d_model=2048, d_ff=5120, num_heads=32, num_layers=24, num_decoder_layers=24),
}
# Qwen3-0.6B's public configuration (the teacher of "qwen3-random") and a quarter-depth, half-width
# student with the same 151,936-entry vocabulary (tied embeddings, as Qwen3-0.6B's).
QWEN3_CONFIGS = {
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
    "student": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=7, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64),
}


@dataclass
class BenchEnvConfig:
    """Vector-env steps/s against the teacher's own generate tokens/s (docs/benchmarks.md)."""

    env_id: str | None = None  # registered task (default: the Synthetic task for "embedded", XSum for "flan-t5-random")
    env_kwargs: dict = field(default_factory=dict)  # env overrides; teacher/student/tokenizer (dirs) and data (file) replace the models
    models: str = "embedded"  # "embedded" (the synthetic task's T5s), "embedded-causal" (its Llamas), "flan-t5-random" (FLAN-T5-small/XL configs, random weights), "flan-t5-base-random" (a FLAN-T5-base teacher, small student: sizes a CPU runs) or "qwen3-random" (a Qwen3-0.6B teacher config, random weights)
    batch_size: int = 32  # rows of the vector env = generate batch size
    new_tokens: int | None = None  # tokens per episode (default: 20 embedded, 64 flan-t5-random, 32 qwen3-random)
    prompt_length: int | None = None  # max prompt tokens (default: 32 embedded, 512 flan-t5-random, 128 qwen3-random)
    repeats: int = 10  # timed episodes per variant (interleaved); medians are reported
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    dtype: str = "float32"  # "float32", "bfloat16" or "float16"
    threads: int = 0  # torch CPU threads (0: torch's default)
    seed: int = 0  # seeds random weights and rollout sampling
    no_cache: bool = True  # also time the no-cache reference (full forward on the whole prefix every step)
    rollout: bool = True  # also time the on-policy rollout (incremental student + env)
    train_embedded: bool = True  # "embedded": train and cache the synthetic models if needed (minutes); false: random weights, same architectures
    profile: str = ""  # "env" or "rollout": print the top of a cProfile of that variant (one extra episode)
    output: str | None = None  # optional JSON file for the results

    def validate(self) -> None:
        _validate_common(self)
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.profile not in ("", "env", "rollout"):
            raise ValueError(f"profile must be '', 'env' or 'rollout', got {self.profile!r}")


def _validate_common(config: Any) -> None:
    if config.models not in MODEL_CHOICES:
        raise ValueError(f"models must be one of {list(MODEL_CHOICES)}, got {config.models!r}")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    if config.new_tokens is not None and config.new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {config.new_tokens}")
    if config.prompt_length is not None and config.prompt_length < 2:
        raise ValueError(f"prompt_length must be >= 2, got {config.prompt_length}")
    unknown = set(config.env_kwargs) & {"max_new_tokens", "max_prompt_length", "device", "dtype", "num_envs"}
    if unknown:
        raise ValueError(f"set {sorted(unknown)} through the benchmark's own flags, not env_kwargs")


# ---------------------------------------------------------------------------------------------- models


@dataclass
class BenchModels:
    """The loaded models and task of a benchmark."""

    teacher: Any  # PreTrainedModel, on the benchmark's device and dtype
    student: Any
    tokenizer: Any
    data: str  # a JSON-lines file of the task's examples
    env_id: str
    description: str  # what the models are (printed and written to the results)
    new_tokens: int
    prompt_length: int


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _random_t5(config, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: FLAN-T5-XL has 2.8 B parameters
        model = T5ForConditionalGeneration(config)
    return model.to(dtype=dtype).eval()


def _random_qwen3(size: str, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, **QWEN3_CONFIGS[size])
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    return model.to(dtype=dtype).eval()


def flan_t5_config(size: str, vocab_size: int = 32128):
    """The T5Config of FLAN-T5-``size`` ("small", "base" or "xl") as published (T5 v1.1, gated-gelu, no output scaling)."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size, d_kv=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        **FLAN_T5_CONFIGS[size],
    )


def _synthetic_assets_available() -> bool:
    import tw_env.synthetic as synthetic

    return callable(getattr(synthetic, "ensure_synthetic_models", None))


def prepare_models(
    models: str, env_kwargs: dict, device: str, dtype: str, seed: int = 0, train_embedded: bool = True,
    new_tokens: int | None = None, prompt_length: int | None = None, env_id: str | None = None,
) -> BenchModels:
    """Load (or build) the teacher, student, tokenizer and task data a benchmark runs on.

    ``env_kwargs`` entries ``teacher``, ``student``, ``tokenizer`` (directories) and ``data`` (a file)
    replace the corresponding part of ``models``.
    """
    from tw_env.models import load_model, load_tokenizer, resolve_device, resolve_dtype

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    given = {k: env_kwargs.get(k) for k in _OVERRIDES}
    parts: dict[str, Any] = {}
    if models in ("embedded", "embedded-causal"):
        defaults = (20, 32)
        causal = models == "embedded-causal"
        env_id = env_id or (SYNTHETIC_CAUSAL_ID if causal else SYNTHETIC_ID)
        if all(given.values()):
            description = "given models"
        elif causal or (train_embedded and _synthetic_assets_available()):
            from tw_env.synthetic import ensure_synthetic_models

            assets = ensure_synthetic_models(seed=seed, causal=causal)
            parts = dict(
                teacher=str(assets.teacher_dir), student=str(assets.student_dir),
                tokenizer=str(assets.tokenizer_dir), data=str(Path(assets.data_dir) / "validation.jsonl"),
            )
            pair = "Llama" if causal else "T5"
            description = f"embedded synthetic-task {pair} models (trained, cached by tw_env.synthetic)"
        else:
            parts = _random_embedded(dev, dt, seed)
            why = "tw_env.synthetic.ensure_synthetic_models is not available" if train_embedded else "train_embedded=false"
            description = f"embedded architectures with random weights ({why})"
    elif models == "qwen3-random":
        defaults = (32, 128)
        env_id = env_id or XSUM_ID
        # The real T5 tokenizer's 32k ids are a subset of the model's 151,936 rows: the prompts are real
        # XSum text, the compute is the Qwen3-0.6B architecture's (its full output layer included).
        parts = {"tokenizer": str(T5_TOKENIZER_DIR), "data": str(XSUM_JSONL)}
        if not given["teacher"]:
            parts["teacher"] = _random_qwen3("0.6b", dev, dt, seed)
        if not given["student"]:
            parts["student"] = _random_qwen3("student", dev, dt, seed + 1)
        description = ("Qwen3-0.6B teacher config and a 7-layer, 512-wide Qwen3 student, random weights, "
                       "vocabulary 151,936; XSum prompts through the real T5 tokenizer")
    else:
        defaults = (64, 512)
        env_id = env_id or XSUM_ID
        parts = {"tokenizer": str(T5_TOKENIZER_DIR), "data": str(XSUM_JSONL)}
        teacher_size = "base" if models == "flan-t5-base-random" else "xl"
        if not given["teacher"]:
            parts["teacher"] = _random_t5(flan_t5_config(teacher_size), dev, dt, seed)
        if not given["student"]:
            parts["student"] = _random_t5(flan_t5_config("small"), dev, dt, seed + 1)
        teacher_name = {"xl": "XL", "base": "base"}[teacher_size]
        description = (f"FLAN-T5-{teacher_name} teacher and "
                       "FLAN-T5-small student configs, random weights, the real T5 tokenizer")
    replaced = {k: v for k, v in given.items() if v}
    if replaced and description != "given models":  # say which parts the description no longer covers
        description += "; replaced by the given " + ", ".join(
            f"{k} {v if isinstance(v, str) else type(v).__name__}" for k, v in replaced.items())
    parts.update(replaced)
    teacher = load_model(parts["teacher"], role="teacher", device=dev, dtype=dt)
    student = load_model(parts["student"], role="student", device=dev, dtype=dt)
    tokenizer = load_tokenizer(parts["tokenizer"])
    description += f"; teacher {_parameters(teacher) / 1e6:.2f} M parameters, student {_parameters(student) / 1e6:.2f} M"
    return BenchModels(
        teacher, student, tokenizer, str(parts["data"]), env_id, description,
        new_tokens or defaults[0], prompt_length or defaults[1],
    )


def _random_embedded(device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """The embedded task's architectures and tokenizer with random weights, and a data file."""
    from tw_env.synthetic import (
        SyntheticLanguage,
        build_tokenizer,
        padded_vocab_size,
        student_config,
        teacher_config,
    )

    language = SyntheticLanguage(seed=seed)
    tokenizer = build_tokenizer(language)
    vocab = padded_vocab_size(tokenizer)
    data = Path(tempfile.mkdtemp(prefix="tw_bench_")) / "synthetic.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in language.sample(256, rng_seed=seed)))
    return dict(
        teacher=_random_t5(teacher_config(vocab), device, dtype, seed),
        student=_random_t5(student_config(vocab), device, dtype, seed + 1),
        tokenizer=tokenizer, data=str(data),
    )


def make_vector_env(bm: BenchModels, num_envs: int, env_kwargs: dict, device: str, dtype: str):
    """The registered task's native vector env around the benchmark's models."""
    from tw_env.models import resolve_device
    from tw_env.registration import make_vector_env as make_registered_vector_env

    rest = {k: v for k, v in env_kwargs.items() if k not in _OVERRIDES}
    kwargs = dict(
        teacher=bm.teacher, student=bm.student, tokenizer=bm.tokenizer, max_new_tokens=bm.new_tokens,
        max_prompt_length=bm.prompt_length, device=str(resolve_device(device)), dtype=dtype, **rest,
    )
    return make_registered_vector_env(bm.env_id, num_envs, data=bm.data, **kwargs)


def task_prompts(env, indices, budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The env's own prompts Y for ``indices`` at ``budget``, right-padded: (input_ids, attention_mask)."""
    task = env.unwrapped.task
    return task.prompts([task.examples[int(i)].source for i in indices], [budget] * len(indices))


# ---------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall-clock seconds of ``fn()`` (device work included) and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """One untimed warm-up per variant, then ``repeats`` rounds of A B C ...: seconds per variant."""
    for fn in variants.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            seconds[name].append(timed(fn, device)[0])
    return seconds


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu": cpu, "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def finite_ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 and math.isfinite(denominator) else float("nan")


# ---------------------------------------------------------------------------------------------- variants


def _fixed_action(bm: BenchModels, vocab_size: int) -> int:
    """A token that is neither EOS nor padding (nor, where possible, a special token)."""
    special = {bm.tokenizer.eos_token_id, bm.tokenizer.pad_token_id, bm.tokenizer.unk_token_id,
               bm.teacher.config.eos_token_id, getattr(bm.teacher.config, "decoder_start_token_id", None)}
    return next(t for t in range(3, vocab_size) if t not in special)


def _env_episode(envs, options: dict, action: int, new_tokens: int) -> None:
    envs.reset(options=options)
    actions = np.full(envs.num_envs, action, dtype=np.int64)
    for step in range(new_tokens):
        _, _, terminated, truncated, _ = envs.step(actions)
        if terminated.any() or (truncated.any() and step < new_tokens - 1):
            raise RuntimeError("an episode ended early; the benchmark needs episodes of exactly new_tokens steps")
    if not truncated.all():
        raise RuntimeError(f"episodes did not end after new_tokens={new_tokens} steps")


def _rollout_episode(envs, policy, options: dict, new_tokens: int, eos: int, generator: torch.Generator) -> None:
    """One on-policy episode as phase 2 collects it (sampled actions), kept to exactly N steps."""
    from agents.policy import choose_actions

    obs, _ = envs.reset(options=options)
    base = envs.unwrapped
    vocab = policy.vocab_size
    rollout = policy.rollout(envs.num_envs, new_tokens)
    for _ in range(new_tokens):
        logits = rollout.logits(obs)
        logits[:, eos] = -math.inf
        teacher_eos = base.batch.teacher_logprobs.argmax(dim=-1).to(logits.device) == eos
        logits[:, vocab] = torch.where(teacher_eos, -math.inf, logits[:, vocab])
        actions = choose_actions(logits, 1.0, generator).cpu().numpy()  # as the trainer samples
        obs, _, terminated, _, _ = envs.step(actions)
        if terminated.any():
            raise RuntimeError("a rollout episode ended early")


def _generate(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``generate`` on right-padded prompts, as the model's family wants them (a causal LM's left-padded)."""
    from tw_env.families import family_of

    family = family_of(model)
    generate_ids, generate_mask = family.generation_inputs(ids, mask)
    out = model.generate(
        input_ids=generate_ids, attention_mask=generate_mask, do_sample=False, num_beams=1,
        min_new_tokens=new_tokens, max_new_tokens=new_tokens,
        pad_token_id=model.config.pad_token_id, eos_token_id=model.config.eos_token_id,
    )
    produced = family.generated_tokens(out, generate_ids.shape[1]).shape[1]
    if produced != new_tokens:
        raise RuntimeError(f"generate produced {produced} tokens, expected {new_tokens}")
    return out


@torch.no_grad()
def _no_cache(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, eos: int) -> torch.Tensor:
    """Greedy decoding that re-runs the full forward on the whole prefix at every step (for T5 the
    encoder and the decoder; for a causal LM the left-padded prompt and the output so far): the
    family's ``next_token_logits``. Returns the ``[B, new_tokens]`` output tokens."""
    from tw_env.families import family_of

    family = family_of(model)
    output = ids.new_zeros((ids.shape[0], 0), dtype=torch.long)
    for _ in range(new_tokens):
        logits = family.next_token_logits(model, ids, mask, output)
        logits[:, eos] = -math.inf
        output = torch.cat([output, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return output


def _print_profile(fn: Callable[[], Any], top: int = 25) -> str:
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(top)
    text = stream.getvalue()
    print(text)
    return text


# ---------------------------------------------------------------------------------------------- run


def run(config: BenchEnvConfig) -> dict[str, Any]:
    """Time the variants and return tokens/s, their ratios and the machine (also printed)."""
    from transformers.utils import logging as hf_logging

    from agents.policy import StudentPolicy
    from agents.run import start_run

    device = start_run(config, None).device  # validate, threads, device; the result file is `output`
    hf_logging.set_verbosity_error()
    bm = prepare_models(
        config.models, config.env_kwargs, config.device, config.dtype, config.seed, config.train_embedded,
        config.new_tokens, config.prompt_length, config.env_id,
    )
    batch, n = config.batch_size, bm.new_tokens
    envs = make_vector_env(bm, batch, config.env_kwargs, config.device, config.dtype)
    base = envs.unwrapped
    budget = 0.3 if any(abs(b - 0.3) < 1e-6 for b in base.budgets) else float(base.budgets[0])
    indices = np.arange(batch) % len(base.examples)
    options = {"index": indices.tolist(), "budget": budget}
    ids, mask = task_prompts(envs, indices, budget)
    ids, mask = ids.to(device), mask.to(device)
    eos = int(bm.teacher.config.eos_token_id)
    action = _fixed_action(bm, base.vocab_size)

    variants: dict[str, Callable[[], Any]] = {
        "env": lambda: _env_episode(envs, options, action, n),
        "teacher_generate": lambda: _generate(bm.teacher, ids, mask, n),
    }
    if config.rollout:
        policy = StudentPolicy(bm.student).to(device).eval()
        generator = torch.Generator(device=device).manual_seed(config.seed)
        variants["rollout"] = lambda: _rollout_episode(envs, policy, options, n, eos, generator)
        variants["student_generate"] = lambda: _generate(bm.student, ids, mask, n)
    if config.no_cache:
        variants["no_cache"] = lambda: _no_cache(bm.teacher, ids, mask, n, eos)

    seconds = interleaved(variants, config.repeats, device)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    tokens = batch * n
    tokens_per_s = {name: tokens / s for name, s in median.items()}
    gen = median["teacher_generate"]
    ratios = {"env_vs_generate": finite_ratio(gen, median["env"])}
    if "no_cache" in median:
        ratios["no_cache_vs_generate"] = finite_ratio(gen, median["no_cache"])
    if "rollout" in median:
        ratios["rollout_vs_generate"] = finite_ratio(gen, median["rollout"])
        ratios["rollout_vs_both_generate"] = finite_ratio(gen + median["student_generate"], median["rollout"])
    goal = ENV_GOALS["cuda" if device.type == "cuda" else "cpu"]
    result = {
        "benchmark": "env",
        "config": dataclasses.asdict(config),
        "machine": machine_info(device),
        "models": bm.description,
        "env_id": bm.env_id,
        "batch_size": batch,
        "new_tokens": n,
        "prompt_tokens_max": int(mask.sum(dim=1).max()),
        "tokens_per_episode": tokens,
        "median_seconds": median,
        "seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "ratios": ratios,
        "goal_env_vs_generate": goal,
        "meets_goal": bool(ratios["env_vs_generate"] >= goal),
    }
    _print_env_table(result)
    if config.profile:
        result["profile"] = _print_profile(variants[config.profile])
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        write_json(config.output, result)
    envs.close()
    return result


def _print_env_table(result: dict[str, Any]) -> None:
    print(f"models: {result['models']}")
    print(f"env {result['env_id']}, batch {result['batch_size']}, {result['new_tokens']} tokens per episode, "
          f"prompts up to {result['prompt_tokens_max']} tokens; machine {result['machine']}")
    print(f"{'variant':<18}{'median s/episode':>18}{'tokens/s':>12}")
    for name, s in result["median_seconds"].items():
        print(f"{name:<18}{s:>18.4f}{result['tokens_per_s'][name]:>12.0f}")
    for name, value in result["ratios"].items():
        print(f"{name:<28}{value:.3f}")
    print(f"goal env_vs_generate >= {result['goal_env_vs_generate']}: {'met' if result['meets_goal'] else 'NOT met'}")


if __name__ == "__main__":
    from scripts.cli import main

    raise SystemExit(main(["bench-env", *__import__("sys").argv[1:]]))
