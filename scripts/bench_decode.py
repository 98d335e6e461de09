"""`tw bench-decode`: Training Wheels decode latency and batched throughput against its neighbours.

Batch size 1, per example (medians over interleaved repeats, then the mean over examples):

- **student** and **teacher**: each model alone, ``generate`` (greedy) through
  :func:`agents.decoding.generate_alone`.
- **tw@f**: :func:`agents.decoding.teacher_help_decode` with a policy that calls the teacher on a
  fraction f of the tokens; its measured teacher fraction f gives the goal's ratio
  ``tw / (student + f × teacher)`` (the issue: ≤ 1.1). The teacher is idle until a call, then reads
  every token it has not seen in one forward, so the ideal is the student's latency plus f of the
  teacher's.
- **speculative**: lossy speculative decoding (Appendix, Algorithm 1) at one lenience and draft
  length, for context.

Batched throughput (output tokens per second): Training Wheels at ``batch_size`` rows against
transformers' assisted generation (``teacher.generate(..., assistant_model=student)``), which runs
at batch size 1 only (the issue: ≥ 5×). The teacher's own ``generate`` at ``batch_size`` is given
for context.

The default policy: a :class:`~agents.policy.StudentPolicy` around the student whose <τ> head has
zero weight and a bias b, so that its <τ> logit is the constant b and it calls the teacher exactly
where the logsumexp of the student's token logits is below b, i.e. π(<τ>) > ½ (its flattest,
least confident positions). b is set by
bisection, on the batched prompts, so that Training Wheels decoding calls the teacher on the target
fraction of the tokens (``call_rates``); the fraction measured at batch size 1 is the one reported
and used. ``--policy DIR`` measures a trained policy instead (its own rate at ``budget``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.bench_env import (
    _validate_common,
    finite_ratio,
    machine_info,
    make_vector_env,
    prepare_models,
    task_prompts,
    timed,
)
from tw_env.atomic import write_json

LATENCY_GOAL = 1.1  # tw / (student + f × teacher) at batch size 1, at most
THROUGHPUT_GOAL = 5.0  # batched Training Wheels tokens/s / assisted generation (batch 1) tokens/s, at least


@dataclass
class BenchDecodeConfig:
    """Decode latency (batch 1) and batched throughput of Training Wheels against its neighbours."""

    env_id: str | None = None  # registered task whose prompts are used (default: by models)
    env_kwargs: dict = field(default_factory=dict)  # env overrides; teacher/student/tokenizer (dirs) and data (file) replace the models
    models: str = "embedded"  # "embedded" (the synthetic task's models) or "flan-t5-random" (FLAN-T5-small/XL configs, random weights) or "flan-t5-base-random" (base teacher, small student)
    policy: str | None = None  # a trained policy directory (default: the student with a calibrated <τ> bias)
    call_rates: list = field(default_factory=lambda: [0.1, 0.3, 0.5])  # target teacher fractions of the default policy
    budget: float = 0.3  # the budget keyword in the prompts
    examples: int = 16  # examples decoded one at a time (batch size 1)
    batch_size: int = 32  # rows of the batched throughput comparison
    assisted_examples: int = 8  # examples for assisted generation (batch size 1; slow with random weights)
    new_tokens: int | None = None  # most output tokens (default: 20 embedded, 64 flan-t5-random)
    prompt_length: int | None = None  # max prompt tokens (default: 32 embedded, 512 flan-t5-random)
    lenience: float = 0.5  # lenience l of lossy speculative decoding
    draft_length: int = 4  # draft length K of lossy speculative decoding
    repeats: int = 3  # timed passes (interleaved); medians per example
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    dtype: str = "float32"  # "float32", "bfloat16" or "float16"
    threads: int = 0  # torch CPU threads (0: torch's default)
    seed: int = 0  # seeds random weights
    train_embedded: bool = True  # "embedded": train and cache the synthetic models if needed (minutes); false: random weights, same architectures
    output: str | None = None  # optional JSON file for the results

    def validate(self) -> None:
        _validate_common(self)
        if self.examples < 1 or self.assisted_examples < 0 or self.repeats < 1:
            raise ValueError(
                f"examples and repeats must be >= 1 and assisted_examples >= 0, got {self.examples}, "
                f"{self.repeats} and {self.assisted_examples}"
            )
        if self.policy is None and (not self.call_rates or any(not 0 <= float(r) <= 1 for r in self.call_rates)):
            raise ValueError(f"call_rates must be fractions in [0, 1], got {self.call_rates}")
        if not 0 <= self.lenience <= 1 or self.draft_length < 1:
            raise ValueError(f"need lenience in [0, 1] and draft_length >= 1, got {self.lenience} and {self.draft_length}")


# ---------------------------------------------------------------------------------------------- policy


def _set_call_bias(policy, bias: float) -> None:
    with torch.no_grad():
        policy.call_head.weight.zero_()
        policy.call_head.bias.fill_(bias)


def calibrated_policy(student, teacher, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, rate: float,
                      iterations: int = 12):
    """A StudentPolicy whose constant <τ> logit b makes Training Wheels call on ``rate`` of the tokens.

    Returns the policy and the fraction it reached on ``ids`` (bisection over b between the smallest
    and the largest top-token logit the student produces on its own outputs).
    """
    from agents.decoding import generate_alone, teacher_help_decode
    from agents.policy import StudentPolicy

    policy = StudentPolicy(student).to(student.device).eval()
    # Greedy decoding calls iff π(<τ>) > ½, i.e. iff the bias exceeds the logsumexp of the token
    # logits; its values on the student's own greedy outputs bound the useful biases.
    alone = generate_alone(student, ids, mask, new_tokens)
    width = max(max(alone.lengths), 1)
    state = torch.zeros(len(alone.output_ids), width, dtype=torch.long, device=student.device)
    valid = torch.zeros_like(state, dtype=torch.bool)
    for row, out in enumerate(alone.output_ids):
        state[row, : len(out)] = torch.tensor(out, dtype=torch.long)
        valid[row, : len(out)] = True
    with torch.no_grad():
        logits = policy(ids.to(student.device), mask.to(student.device), state, valid.long()).float()
    top = torch.logsumexp(logits[..., : policy.vocab_size], dim=-1)[valid]
    lo, hi = float(top.min()) - 1.0, float(top.max()) + 1.0
    if rate <= 0:
        _set_call_bias(policy, -1e4)
        return policy, 0.0
    if rate >= 1:
        _set_call_bias(policy, 1e4)
        return policy, 1.0
    best = (math.inf, lo, 0.0)
    for _ in range(iterations):
        bias = 0.5 * (lo + hi)
        _set_call_bias(policy, bias)
        reached = _fraction(teacher_help_decode(policy, teacher, ids, mask, new_tokens))
        if abs(reached - rate) < best[0]:
            best = (abs(reached - rate), bias, reached)
        if reached < rate:
            lo = bias
        else:
            hi = bias
    _set_call_bias(policy, best[1])
    return policy, best[2]


def _fraction(result) -> float:
    """Teacher tokens / output tokens over a whole DecodeResult."""
    tokens = sum(result.lengths)
    return sum(result.teacher_calls) / tokens if tokens else 0.0


def _cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
    return row[:end]


def _assisted(teacher, student, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> int:
    """transformers' assisted generation at batch size 1 (greedy); returns the output tokens."""
    out = teacher.generate(
        input_ids=ids, attention_mask=mask, assistant_model=student, do_sample=False, num_beams=1,
        max_new_tokens=new_tokens, pad_token_id=teacher.config.pad_token_id,
    )
    eos = teacher.config.eos_token_id
    return len(_cut_at_eos(out[0, 1:].tolist(), {eos} if isinstance(eos, int) else set(eos)))


# ---------------------------------------------------------------------------------------------- run


def run(config: BenchDecodeConfig) -> dict[str, Any]:
    """Time every decoder and return latencies, throughputs, teacher fractions and the ratios."""
    from transformers.utils import logging as hf_logging

    from agents.decoding import generate_alone, speculative_decode, teacher_help_decode
    from agents.policy import StudentPolicy
    from agents.run import start_run

    device = start_run(config, None).device  # validate, threads, device; the result file is `output`
    hf_logging.set_verbosity_error()
    env_kwargs = dict(config.env_kwargs)
    trained = None
    if config.policy:
        trained = StudentPolicy.load(config.policy, device=device, dtype=config.dtype).eval()
        env_kwargs.setdefault("student", trained.model)
    bm = prepare_models(
        config.models, env_kwargs, config.device, config.dtype, config.seed, config.train_embedded,
        config.new_tokens, config.prompt_length, config.env_id,
    )
    n = bm.new_tokens
    teacher, student = bm.teacher, bm.student
    env = make_vector_env(bm, 1, env_kwargs, config.device, config.dtype)
    count = len(env.unwrapped.examples)
    single = [tuple(t.to(device) for t in task_prompts(env, [i % count], config.budget)) for i in range(config.examples)]
    batch_ids, batch_mask = (t.to(device) for t in task_prompts(env, np.arange(config.batch_size) % count, config.budget))
    env.close()

    # ---- policies
    policies: dict[str, Any] = {}
    calibration: dict[str, float] = {}
    if trained is not None:
        policies["tw@trained"] = trained
    else:
        for rate in config.call_rates:
            policy, reached = calibrated_policy(student, teacher, batch_ids, batch_mask, n, float(rate))
            policies[f"tw@{float(rate):g}"] = policy
            calibration[f"tw@{float(rate):g}"] = reached

    # ---- batch size 1: latency per example
    methods: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
        "student": lambda i, m: generate_alone(student, i, m, n),
        "teacher": lambda i, m: generate_alone(teacher, i, m, n, is_teacher=True),
        "speculative": lambda i, m: speculative_decode(student, teacher, i, m, n, config.lenience, config.draft_length),
    }
    for name, policy in policies.items():
        methods[name] = lambda i, m, p=policy: teacher_help_decode(p, teacher, i, m, n)
    outputs = {name: [fn(*single[e]) for e in range(len(single))] for name, fn in methods.items()}  # warm-up
    per_example: dict[str, list[list[float]]] = {name: [[] for _ in single] for name in methods}
    for _ in range(config.repeats):
        for e, (ids, mask) in enumerate(single):
            for name, fn in methods.items():
                per_example[name][e].append(timed(lambda f=fn, i=ids, m=mask: f(i, m), device)[0])
    latency = {name: statistics.mean(statistics.median(s) for s in rows) for name, rows in per_example.items()}
    tokens_1 = {name: statistics.mean(sum(r.lengths) for r in results) for name, results in outputs.items()}
    fraction = {name: _fraction_all(results) for name, results in outputs.items()}
    latency_ratios = {
        name: finite_ratio(latency[name], latency["student"] + fraction[name] * latency["teacher"])
        for name in policies
    }

    # ---- batched throughput against assisted generation (batch size 1)
    batched: dict[str, Callable[[], Any]] = {
        f"{name}_batch": (lambda p=policy: teacher_help_decode(p, teacher, batch_ids, batch_mask, n))
        for name, policy in policies.items()
    }
    batched["teacher_batch"] = lambda: generate_alone(teacher, batch_ids, batch_mask, n, is_teacher=True)
    assisted_inputs = single[: config.assisted_examples]
    if assisted_inputs:
        batched["assisted_b1"] = lambda: sum(_assisted(teacher, student, i, m, n) for i, m in assisted_inputs)
    # Assisted generation can never beat the student alone at batch size 1 (every draft accepted):
    # a bound that holds whatever the acceptance rate (random weights accept almost nothing).
    bound_inputs = assisted_inputs or single[:1]
    batched["student_b1"] = lambda: sum(sum(generate_alone(student, i, m, n).lengths) for i, m in bound_inputs)
    warm = {name: fn() for name, fn in batched.items()}  # warm-up; outputs are deterministic
    produced = {name: out if isinstance(out, int) else sum(out.lengths) for name, out in warm.items()}
    # With any row calling, the batched teacher catches up: how often it ran, per student step.
    teacher_forwards = {
        name: out.teacher_forwards / max(out.student_forwards, 1)
        for name, out in warm.items() if name.startswith("tw@")
    }
    batch_seconds: dict[str, list[float]] = {name: [] for name in batched}
    for _ in range(config.repeats):
        for name, fn in batched.items():
            batch_seconds[name].append(timed(fn, device)[0])
    throughput = {name: produced[name] / statistics.median(s) for name, s in batch_seconds.items()}
    throughput_ratios = {}
    for name in policies:
        tw = throughput[f"{name}_batch"]
        throughput_ratios[f"{name}_vs_assisted"] = finite_ratio(tw, throughput.get("assisted_b1", float("nan")))
        throughput_ratios[f"{name}_vs_student_b1_bound"] = finite_ratio(tw, throughput["student_b1"])

    result = {
        "benchmark": "decode",
        "config": dataclasses.asdict(config),
        "machine": machine_info(device),
        "models": bm.description + (f"; trained policy {config.policy}" if config.policy else ""),
        "env_id": bm.env_id,
        "new_tokens": n,
        "calibrated_fraction": calibration,
        "latency_ms": {k: 1000 * v for k, v in latency.items()},
        "output_tokens": tokens_1,
        "teacher_fraction": fraction,
        "wasted_tokens": {"speculative": statistics.mean(sum(r.wasted_tokens) for r in outputs["speculative"])},
        "latency_ratios": latency_ratios,
        "goal_latency_ratio_max": LATENCY_GOAL,
        "meets_latency_goal": {k: bool(v <= LATENCY_GOAL) for k, v in latency_ratios.items()},
        "throughput_tokens_per_s": throughput,
        "batched_tokens": produced,
        "batched_teacher_forwards_per_step": teacher_forwards,
        "throughput_ratios": throughput_ratios,
        "goal_throughput_ratio_min": THROUGHPUT_GOAL,
        "meets_throughput_goal": {
            k: bool(v >= THROUGHPUT_GOAL) for k, v in throughput_ratios.items() if k.endswith("_vs_assisted")
        },
        "seconds": {"batch1": per_example, "batched": batch_seconds},
    }
    _print_decode_tables(result, config)
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        write_json(config.output, result)
    return result


def _fraction_all(results) -> float:
    tokens = sum(sum(r.lengths) for r in results)
    return sum(sum(r.teacher_calls) for r in results) / tokens if tokens else 0.0


def _print_decode_tables(result: dict[str, Any], config: BenchDecodeConfig) -> None:
    print(f"models: {result['models']}")
    print(f"task {result['env_id']}, up to {result['new_tokens']} new tokens; machine {result['machine']}")
    print(f"batch size 1, {config.examples} examples, {config.repeats} repeats "
          f"(speculative: lenience {config.lenience}, draft length {config.draft_length})")
    print(f"{'method':<16}{'latency ms':>12}{'tokens':>9}{'teacher f':>11}{'ratio':>9}")
    for name, ms in result["latency_ms"].items():
        ratio = result["latency_ratios"].get(name)
        print(f"{name:<16}{ms:>12.2f}{result['output_tokens'][name]:>9.1f}{result['teacher_fraction'][name]:>11.3f}"
              + (f"{ratio:>9.3f}" if ratio is not None else ""))
    print(f"ratio = tw / (student + f × teacher); goal <= {LATENCY_GOAL}")
    print(f"batched: {config.batch_size} rows; assisted generation at batch size 1 over {config.assisted_examples} examples")
    for name, tps in result["throughput_tokens_per_s"].items():
        forwards = result["batched_teacher_forwards_per_step"].get(name)
        print(f"{name:<20}{tps:>12.0f} tokens/s" + (f"  (teacher forwards per step {forwards:.2f})" if forwards else ""))
    for name, ratio in result["throughput_ratios"].items():
        goal = f"  (goal >= {THROUGHPUT_GOAL})" if name.endswith("_vs_assisted") else "  (bound: assisted <= student alone)"
        print(f"{name:<36}{ratio:.2f}{goal}")


if __name__ == "__main__":
    from scripts.cli import main

    raise SystemExit(main(["bench-decode", *__import__("sys").argv[1:]]))
