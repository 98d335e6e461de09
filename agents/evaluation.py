"""Measuring decoders: the one decode–count–score loop (:func:`decode_batches`) that `tw eval`'s
rows, its threshold calibrations and checkpoint selection's per-budget evaluation all run; one row of
`tw eval` (:func:`evaluate_setting`: quality, teacher use, throughput, then latency at batch size 1);
the selection rule; the threshold searches; and the latency cost model of `tw eval` / `tw plot`.
What each method decodes is :mod:`agents.methods`."""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from agents.decoding import DecodeResult, decode_text, teacher_help_decode
from agents.distributed import SINGLE, Distributed, all_gather_objects, shard
from agents.policy import StudentPolicy, write_call_rule
from tw_env.metrics import quality
from tw_env.task import Task
from tw_env.tasks import Example

T = TypeVar("T")
Prompts = tuple[torch.Tensor, ...]  # (input_ids, attention_mask[, teacher_input_ids, teacher_attention_mask])
Decode = Callable[..., DecodeResult]  # a decoder at one setting: Prompts -> DecodeResult


# ---------------------------------------------------------------------------------------------- decode, count, score
@dataclass
class Decoded:
    """What decoding a list of batches produced (per example, in order) and what it counted."""

    texts: list[str]
    output_ids: list[list[int]]
    from_teacher: list[list[bool]]
    teacher_calls: int  # Σ teacher tokens
    tokens: int  # Σ output tokens (EOS included)
    wasted: int  # Σ rejected draft tokens
    seconds: float  # wall time of the decode calls alone

    @property
    def teacher_fraction(self) -> float:
        """Σ teacher tokens / Σ output tokens (token level, over the whole set)."""
        return self.teacher_calls / max(self.tokens, 1)

    def quality(self, metric: str, references: Sequence[str]) -> float:
        return quality(metric, self.texts, list(references))


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_batches(
    decode: Decode, batches: Iterable[Prompts], tokenizer: PreTrainedTokenizerBase, device: torch.device | None = None
) -> Decoded:
    """Decode every batch of prompts with ``decode`` and count: the one loop of every evaluation.

    ``batches`` may encode lazily (a generator): only the decode calls are timed, with
    ``torch.cuda.synchronize(device)`` around each on a GPU ``device``.
    """
    texts: list[str] = []
    output_ids: list[list[int]] = []
    from_teacher: list[list[bool]] = []
    calls = tokens = wasted = 0
    seconds = 0.0
    for inputs in batches:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            result = decode(*inputs)
        _sync(device)
        seconds += time.perf_counter() - start
        calls += sum(result.teacher_calls)
        tokens += sum(result.lengths)
        wasted += sum(result.wasted_tokens)
        texts += decode_text(result, tokenizer)
        output_ids += result.output_ids
        from_teacher += result.from_teacher
    return Decoded(texts, output_ids, from_teacher, calls, tokens, wasted, seconds)


class ThresholdDecodes:
    """Decode a fixed list of prompt batches at many call thresholds, each batch once per distinct
    set of call decisions: the threshold searches' decoder.

    A Training Wheels decode (:func:`~agents.decoding.teacher_help_decode`) is deterministic and
    reports the range of log thresholds under which every one of its call decisions would repeat
    (:attr:`~agents.decoding.DecodeResult.same_decisions`). A later threshold inside a batch's
    range reuses that batch's result instead of decoding it again (the bisection's late probes
    move the threshold by little, so many batches repeat). The results are exactly those of
    decoding every batch at every threshold. ``decoder(threshold)`` gives the decoder at a
    threshold; batches are decoded as whole batches, as :func:`decode_batches` does.
    """

    def __init__(self, decoder: Callable[[float], Decode], batches: Sequence[Prompts],
                 tokenizer: PreTrainedTokenizerBase) -> None:
        self.decoder, self.batches, self.tokenizer = decoder, list(batches), tokenizer
        self.done: list[list[DecodeResult]] = [[] for _ in self.batches]  # per batch, the results decoded so far
        self.decoded = self.reused = 0  # batch decodes run, batch results reused

    def _reusable(self, batch: int, threshold: float) -> DecodeResult | None:
        # The decoders compare float32 log π(<τ>) with log c rounded to float32 (a Python scalar
        # against a float32 tensor), so the range is checked at that precision.
        log_c = float(np.float32(math.log(threshold))) if threshold > 0 else -math.inf
        for result in self.done[batch]:
            if result.same_decisions is not None and result.same_decisions[0] <= log_c < result.same_decisions[1]:
                return result
        return None

    def decode(self, threshold: float) -> Decoded:
        """Every batch at call threshold ``threshold``: what :func:`decode_batches` would return
        (its ``seconds`` count only the decodes run now)."""
        decode = self.decoder(threshold)

        def decode_or_reuse(batch: int, *prompts: torch.Tensor) -> DecodeResult:
            result = self._reusable(batch, threshold)
            if result is not None:
                self.reused += 1
                return result
            result = decode(*prompts)
            self.done[batch].append(result)
            self.decoded += 1
            return result

        # Each batch goes to decode_or_reuse with its index in front, so that it knows which batch it has.
        indexed = cast(Iterable[Prompts], ((i, *p) for i, p in enumerate(self.batches)))
        return decode_batches(decode_or_reuse, indexed, self.tokenizer)


def encode_budget(task: Task, sources: list[str], budget: float, device: torch.device) -> Prompts:
    """The Training Wheels prompts Y (ids, mask), then the teacher's prompts C^(T) (ids, mask)."""
    budgets = [budget] * len(sources)
    return (*task.prompts(sources, budgets, device), *task.teacher_prompts(sources, budgets, device))


def prompt_encoder(task: Task, budget: float | None, plain_prompt: str, device: torch.device) -> Callable[[list[str]], Prompts]:
    """How a setting's sources become prompts: budget ``None`` the plain prompt, else :func:`encode_budget`."""
    def encode(sources: list[str]) -> Prompts:
        if budget is None:
            return task.plain_prompts(sources, plain_prompt, device)
        return encode_budget(task, sources, budget, device)

    return encode


def in_batches(encode: Callable[[list[str]], Prompts], sources: Sequence[str], batch_size: int) -> Iterable[Prompts]:
    """``sources`` in batches of ``batch_size``, each encoded when it is reached."""
    return (encode(list(sources[start : start + batch_size])) for start in range(0, len(sources), batch_size))


def training_wheels_decoder(
    policy: StudentPolicy, teacher: PreTrainedModel, max_new_tokens: int, budget_cap: float | None = None,
    cap_rule: str = "rounded_up", call_threshold: float | None = None, kl_oracle_threshold: float | None = None,
    budget: float | None = None,
) -> Decode:
    """:func:`~agents.decoding.teacher_help_decode` at one setting, on (Y ids, mask, C^(T) ids, mask).
    ``call_threshold`` None: the checkpoint's own threshold at ``budget``."""
    def decode(ids: torch.Tensor, mask: torch.Tensor, teacher_ids: torch.Tensor, teacher_mask: torch.Tensor) -> DecodeResult:
        return teacher_help_decode(
            policy, teacher, ids, mask, max_new_tokens, budget_cap=budget_cap, teacher_input_ids=teacher_ids,
            teacher_attention_mask=teacher_mask, cap_rule=cap_rule, call_threshold=call_threshold,
            kl_oracle_threshold=kl_oracle_threshold, budget=budget)

    return decode


# ---------------------------------------------------------------------------------------------- budgets
@dataclass
class BudgetResult:
    budget: float
    teacher_fraction: float  # calls / output tokens over the whole set (token level)
    quality: float
    examples: int


def evaluate_budgets(
    policy: StudentPolicy, task: Task, examples: Sequence[Example], budgets: Sequence[float], max_new_tokens: int,
    batch_size: int = 64, dist: Distributed = SINGLE,
) -> list[BudgetResult]:
    """Decode every example at every budget (greedy over V + 1, teacher on call) and score it.

    Under data parallelism each rank decodes its shard of ``examples`` and the hypotheses are
    gathered in order, so every rank scores the whole set and returns the same results.
    """
    results: list[BudgetResult] = []
    was_training = policy.training
    policy.eval()
    local_sources = [e.source for e in shard(examples, dist)]
    for budget in budgets:
        def encode(sources: list[str], budget: float = budget) -> Prompts:
            return encode_budget(task, sources, budget, policy.device)

        decode = training_wheels_decoder(policy, task.teacher, max_new_tokens, budget=float(budget))
        decoded = decode_batches(decode, in_batches(encode, local_sources, batch_size), task.tokenizer)
        parts = all_gather_objects((decoded.texts, decoded.teacher_calls, decoded.tokens), dist)
        hypotheses = [h for part, _, _ in parts for h in part]
        calls, tokens = sum(p[1] for p in parts), sum(p[2] for p in parts)
        score = quality(task.metric, hypotheses, [e.reference for e in examples])
        results.append(BudgetResult(float(budget), calls / max(tokens, 1), score, len(examples)))
    policy.train(was_training)
    return results


def quantile_call_thresholds(call_probabilities: dict[float, torch.Tensor]) -> dict[float, float]:
    """Per budget b, the threshold c at which "call iff π(<τ>) > c" calls at a fraction b of the given
    states: the (1 − b) quantile of π(<τ>) over them (linear interpolation between order statistics).

    ``call_probabilities``: {b: π(<τ>) at every decoding state of the episodes run under budget b}.
    Each state counts once, so the fraction is token-weighted, as teacher use is. b = 0 gives the
    largest π seen (no state is strictly above it). Why a quantile: the policy's π(<τ>) crowds
    round ½ (on de→en a shift of 0.05 in c moves teacher use by 0.2), so a fixed c = ½ turns small
    drifts of the policy into large swings of teacher use; the quantile follows the policy as it is.
    """
    thresholds = {}
    for budget, probabilities in call_probabilities.items():
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"budgets lie in [0, 1], got {budget}")
        values = probabilities.detach().float().flatten()
        if values.numel() == 0:
            raise ValueError(f"no decoding states were recorded under budget {budget}: cannot place its threshold")
        thresholds[float(budget)] = float(torch.quantile(values, 1.0 - budget).clamp(0.0, 1.0))
    return thresholds


def calibrate_budgets(
    policy: StudentPolicy, task: Task, examples: Sequence[Example], budgets: Sequence[float], max_new_tokens: int,
    batch_size: int = 64, tolerance: float = 0.005, start_thresholds: dict[float, float] | None = None,
) -> tuple[dict[float, float], list[dict]]:
    """The call rule ``tw train`` ships: per budget b, the threshold c of "call iff π(<τ>) > c" whose
    teacher fraction on ``examples`` (the selection rows) is closest to b
    (:func:`calibrate_call_threshold`, which keeps its start, ½ or ``start_thresholds[b]``, where that
    already lands within ``tolerance``), decoding through :class:`ThresholdDecodes`.

    Returns {b: c} and, per budget, {budget, threshold, teacher_fraction, quality, own_rule_teacher_fraction,
    own_rule_quality, tried: [[c, fraction], …], batch_decodes, batches_reused} (plus start_threshold,
    start_teacher_fraction and start_quality when started elsewhere than ½): the raw rule (c = ½) beside
    the calibrated one.
    """
    sources, references = [e.source for e in examples], [e.reference for e in examples]
    was_training = policy.training
    policy.eval()
    thresholds: dict[float, float] = {}
    report: list[dict] = []
    for budget in (float(b) for b in budgets):
        def encode(batch: list[str], budget: float = budget) -> Prompts:
            return encode_budget(task, batch, budget, policy.device)

        def decoder(threshold: float) -> Decode:
            return training_wheels_decoder(policy, task.teacher, max_new_tokens, call_threshold=threshold)

        decodes = ThresholdDecodes(decoder, list(in_batches(encode, sources, batch_size)), task.tokenizer)
        def fraction_at(threshold: float, decodes: ThresholdDecodes = decodes) -> float:
            return decodes.decode(threshold).teacher_fraction

        # A quantile rule can hold c = 0 or 1 (a budget of 1, or 0 with π(<τ>) = 1 somewhere); the search
        # needs a start strictly inside, so such a start is moved in by a millionth.
        start = min(max((start_thresholds or {}).get(budget, 0.5), 1e-6), 1.0 - 1e-6)
        found = calibrate_call_threshold(fraction_at, budget, tolerance=tolerance, start=start)
        chosen, own = decodes.decode(found.threshold), decodes.decode(0.5)  # ½ is a new decode only from another start
        thresholds[budget] = found.threshold
        entry = {
            "budget": budget, "threshold": found.threshold, "teacher_fraction": chosen.teacher_fraction,
            "quality": chosen.quality(task.metric, references), "own_rule_teacher_fraction": own.teacher_fraction,
            "own_rule_quality": own.quality(task.metric, references), "tried": [list(t) for t in found.tried],
            "batch_decodes": decodes.decoded, "batches_reused": decodes.reused}
        if start != 0.5:
            started = decodes.decode(start)  # the first probe: reused
            entry |= {"start_threshold": start, "start_teacher_fraction": started.teacher_fraction,
                      "start_quality": started.quality(task.metric, references)}
        report.append(entry)
    policy.train(was_training)
    return thresholds, report


def ship_calibrated_call_rule(
    policy: StudentPolicy, directory: str | Path, task: Task, examples: Sequence[Example], budgets: Sequence[float],
    max_new_tokens: int, split: str, batch_size: int = 64, tolerance: float = 0.005,
    start_thresholds: dict[float, float] | None = None,
) -> dict:
    """Calibrate ``policy``'s call threshold per budget on ``examples`` (:func:`calibrate_budgets`), write it
    into the saved policy folder ``directory`` (``call_rule.json``, the rule `tw eval` and the decoders then
    use by default) and set it on ``policy``; returns the report that ``summary.json`` keeps
    ({policy, split, examples, tolerance, budgets, seconds}). ``tw train``'s ``best/`` and the PPO
    ablation's ``final/`` are shipped through it."""
    started = time.time()
    thresholds, entries = calibrate_budgets(policy, task, examples, budgets, max_new_tokens, batch_size=batch_size,
                                            tolerance=tolerance, start_thresholds=start_thresholds)
    report = {"policy": str(directory), "split": split, "examples": len(examples), "tolerance": tolerance,
              "budgets": entries, "seconds": time.time() - started}
    write_call_rule(directory, thresholds, report)
    policy.call_thresholds = thresholds
    return report


def seeded_subset(examples: Sequence[T], count: int, seed: int) -> list[T]:
    """``count`` examples drawn at random without replacement (seeded), kept in their original order.

    The paper selects checkpoints on 512 validation examples sampled at random (§3.3); the first
    512 of a file are often one source or one length band.
    """
    chosen = np.random.default_rng([seed, 1]).permutation(len(examples))[:count]
    return [examples[i] for i in sorted(chosen)]


def budget_violation(teacher_fraction: float, budget: float, ceiling: bool) -> float:
    """How far a teacher fraction breaks its budget: f − b above a ceiling (0 below it), |f − b| for a target.

    Which one applies follows the Lagrangian (§3.3 keeps checkpoints that satisfy the constraint
    within δ): with λ ≥ 0 (``lagrange_floor`` ≥ 0, the paper) b is a ceiling and using less teacher
    is allowed; with a negative floor λ also pays for calls and b is a target.
    """
    excess = teacher_fraction - budget
    return max(excess, 0.0) if ceiling else abs(excess)


def budgets_are_ceilings(lagrange_floor: float) -> bool:
    """λ ≥ 0 treats every budget as a ceiling; a floor below 0 makes them targets."""
    return lagrange_floor >= 0


def worst_violation(results: list[BudgetResult], ceiling: bool) -> float:
    return max(budget_violation(r.teacher_fraction, r.budget, ceiling) for r in results)


def meets_budgets(results: list[BudgetResult], delta: float, ceiling: bool) -> bool:
    """Every budget satisfied within δ: f ≤ b + δ for ceilings, |f − b| ≤ δ for targets."""
    return worst_violation(results, ceiling) <= delta


def mean_quality(results: list[BudgetResult]) -> float:
    return sum(r.quality for r in results) / len(results)


def selection_record(results: list[BudgetResult], delta: float, ceiling: bool) -> dict:
    """What the selection rule compares: whether every budget is met within δ, the worst violation
    and the mean quality (plus the per-budget results)."""
    return {
        "meets_budgets": meets_budgets(results, delta, ceiling), "worst_violation": worst_violation(results, ceiling),
        "mean_quality": mean_quality(results), "budget_rule": "ceiling" if ceiling else "target",
        "results": [dataclasses.asdict(r) for r in results],
    }


def settle_point(evaluations: Sequence[dict], consecutive: int, min_gain: float = 0.0) -> dict | None:
    """Whether phase 2 has settled, from its :func:`selection_record` s in order (each with its ``step``).

    Settled: the last ``consecutive`` evaluations all meet every budget within δ, and validation
    quality has stopped improving: none of them beats the best mean quality of the evaluations
    before them by more than ``min_gain``. Returns ``{"step", "reason"}`` (the last evaluation's
    batch) or None; ``consecutive`` 0 never settles (phase 2 runs all its batches).
    """
    if consecutive < 1 or len(evaluations) <= consecutive:
        return None  # the rule needs evaluations before the run of `consecutive` to compare quality with
    recent, earlier = evaluations[-consecutive:], evaluations[:-consecutive]
    if not all(e["meets_budgets"] for e in recent):
        return None
    best_before = max(e["mean_quality"] for e in earlier)
    best_recent = max(e["mean_quality"] for e in recent)
    if best_recent > best_before + min_gain:
        return None
    return {"step": int(recent[-1]["step"]),
            "reason": f"every budget within δ at the last {consecutive} evaluations (batches "
                      f"{', '.join(str(e['step']) for e in recent)}), whose best mean quality {best_recent:.4g} "
                      f"does not beat the best before them ({best_before:.4g}) by more than {min_gain:g}"}


def is_better_selection(candidate: dict, best: dict | None) -> bool:
    """The §3.3 rule between two :func:`selection_record` s: meeting every budget within δ beats not
    meeting them; among those that meet them the best mean quality wins, among those that do not the
    smallest worst violation (so there is always a usable choice). Ties keep ``best``."""
    if best is None:
        return True
    if candidate["meets_budgets"] != best["meets_budgets"]:
        return bool(candidate["meets_budgets"])
    if candidate["meets_budgets"]:
        return candidate["mean_quality"] > best["mean_quality"]
    return candidate["worst_violation"] < best["worst_violation"]


# ---------------------------------------------------------------------------------------------- calibration
@dataclass
class Calibration:
    """A confidence threshold found for a target teacher fraction, and every threshold tried."""

    target: float
    threshold: float
    teacher_fraction: float  # at ``threshold``, on the calibration examples
    tried: list[tuple[float, float]]  # (threshold, teacher fraction), in the order measured


def calibrate_threshold(
    teacher_fraction_at: Callable[[float], float], target: float, tolerance: float = 0.005, iterations: int = 14,
    lowest: float = 1e-6,
) -> Calibration:
    """The confidence-fallback threshold whose teacher fraction is closest to ``target``.

    Co-LLM and Big Little Decoder compare at matched teacher use by calibrating the deferral
    threshold per fraction on validation data; this does it by bisection. The fraction grows with
    the threshold (more tokens fall below it), and the student's top probability spans orders of
    magnitude (it can be under 0.01 on a tenth of the tokens), so the search bisects log10(t) over
    [``lowest``, 1]. Target 0 is threshold 0, which never falls back. Stops once within ``tolerance``
    of the target; returns the closest threshold seen otherwise.
    """
    _check_search(target, tolerance, iterations)
    if not 0.0 < lowest < 1.0:
        raise ValueError(f"need 0 < lowest < 1, got {lowest}")
    if target == 0.0:
        never = float(teacher_fraction_at(0.0))
        return Calibration(target, 0.0, never, [(0.0, never)])
    tried = _bisect_to_target(lambda x: (10.0 ** x, teacher_fraction_at(10.0 ** x)), target,
                              math.log10(lowest), 0.0, tolerance, iterations)
    return _closest(target, tried)


def calibrate_call_threshold(
    teacher_fraction_at: Callable[[float], float], target: float, tolerance: float = 0.005, iterations: int = 14,
    widest_logit: float = 12.0, start: float = 0.5,
) -> Calibration:
    """The Training Wheels call threshold c (call iff π(<τ>) > c) whose teacher fraction is closest to ``target``.

    Beyond the paper: where the learnt call rate of a budget misses it (the Lagrangian still
    oscillates), the same per-budget calibration on validation data that the confidence fallback
    gets moves teacher use onto the budget while keeping the policy's own ranking of which tokens
    to ask for. The fraction falls as c rises; π(<τ>) is spread in log-odds, so the search bisects
    −logit(c) over [−``widest_logit``, ``widest_logit``], starting from ``start`` (the policy's own
    c = ½, or a threshold the checkpoint already holds), which is kept if it is already within ``tolerance``.
    """
    _check_search(target, tolerance, iterations)
    if widest_logit <= 0:
        raise ValueError(f"widest_logit must be > 0, got {widest_logit}")
    if not 0.0 < start < 1.0:
        raise ValueError(f"the starting call threshold must lie strictly between 0 and 1, got {start}")

    def threshold(x: float) -> float:  # x = −logit(c): the fraction grows with x
        return 1.0 / (1.0 + math.exp(x))

    def measure(x: float) -> tuple[float, float]:
        return threshold(x), teacher_fraction_at(threshold(x))

    # The start as given (not through the logit and back, which can move it by a rounding), then the search.
    first = (start, teacher_fraction_at(start))
    tried = [(first[0], float(first[1]))]
    if abs(tried[0][1] - target) > tolerance:
        tried += _bisect_to_target(measure, target, -widest_logit, widest_logit, tolerance, iterations)
    return _closest(target, tried)


def calibrate_kl_threshold(
    teacher_fraction_at: Callable[[float], float], target: float, tolerance: float = 0.005, iterations: int = 14,
    lowest: float = 1e-4, highest: float = 100.0,
) -> Calibration:
    """The KL threshold k (call iff KL(p ‖ π_V) > k, nats) of the online KL oracle whose teacher
    fraction is closest to ``target``: bisection in log10(k) over [``lowest``, ``highest``]. The
    fraction falls as k rises."""
    _check_search(target, tolerance, iterations)
    if not 0.0 < lowest < highest:
        raise ValueError(f"need 0 < lowest < highest, got {lowest}, {highest}")
    tried = _bisect_to_target(lambda x: (10.0 ** -x, teacher_fraction_at(10.0 ** -x)), target,
                              -math.log10(highest), -math.log10(lowest), tolerance, iterations)
    return _closest(target, tried)


def _check_search(target: float, tolerance: float, iterations: int) -> None:
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target teacher fraction must lie in [0, 1], got {target}")
    if iterations < 1 or tolerance < 0:
        raise ValueError(f"need iterations >= 1 and tolerance >= 0; got {iterations}, {tolerance}")


def _bisect_to_target(
    measure: Callable[[float], tuple[float, float]], target: float, low: float, high: float, tolerance: float,
    iterations: int,
) -> list[tuple[float, float]]:
    """Bisect x in [low, high] for a teacher fraction non-decreasing in x; ``measure(x)`` returns
    (threshold, fraction). The ends are measured first (high, then low): a target outside their
    range stops there. Returns every (threshold, fraction) measured, in order."""
    tried: list[tuple[float, float]] = []

    def fraction_at(x: float) -> float:
        threshold, fraction = measure(x)
        tried.append((threshold, float(fraction)))
        return float(fraction)

    for end in (high, low):
        fraction = fraction_at(end)
        if abs(fraction - target) <= tolerance or (end == high and fraction < target) or (end == low and fraction > target):
            return tried
    for _ in range(iterations):
        middle = (low + high) / 2
        fraction = fraction_at(middle)
        if abs(fraction - target) <= tolerance:
            break
        low, high = (middle, high) if fraction < target else (low, middle)
    return tried


def _closest(target: float, tried: list[tuple[float, float]]) -> Calibration:
    threshold, fraction = min(tried, key=lambda tf: (abs(tf[1] - target), tf[0]))
    return Calibration(target, threshold, fraction, tried)


# ---------------------------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class ForwardCosts:
    """What one decoder forward of each model costs, for projecting latency to other hardware.

    A forward is one incremental decoder step at batch size 1 (a catch-up or verification forward
    over several tokens is counted as one: on a GPU at batch size 1 such forwards cost about the
    same as one token's, since they are memory-bound; on a CPU they cost more, which the projection
    for CPU-measured costs leaves out)."""

    teacher_ms: float
    student_ms: float
    label: str  # where the costs come from, printed on every projected figure

    def __post_init__(self) -> None:
        if not (self.teacher_ms > 0 and self.student_ms > 0):
            raise ValueError(f"per-forward costs must be positive, got teacher {self.teacher_ms} ms, "
                             f"student {self.student_ms} ms")

    def describe(self) -> str:
        return f"{self.label}: teacher {self.teacher_ms:.3g} ms, student {self.student_ms:.3g} ms per forward"


def given_forward_costs(teacher_ms: float | None, student_ms: float | None, label: str) -> ForwardCosts | None:
    """The cost model a user gave (`tw eval`/`tw plot` flags): both costs or neither (None)."""
    if (teacher_ms is None) != (student_ms is None) or any(c is not None and c <= 0 for c in (teacher_ms, student_ms)):
        raise ValueError(f"teacher_forward_ms and student_forward_ms are given together and positive, "
                         f"got {[teacher_ms, student_ms]}")
    if teacher_ms is None or student_ms is None:
        return None
    return ForwardCosts(teacher_ms, student_ms, label or "given")


def projected_latency_ms(teacher_forwards: float, student_forwards: float, costs: ForwardCosts) -> float:
    """Latency of one example under the cost model: forwards of each model times its cost."""
    return teacher_forwards * costs.teacher_ms + student_forwards * costs.student_ms


def with_projected_latency(rows: Sequence[dict], costs: ForwardCosts | None) -> list[dict]:
    """Copies of result rows with ``projected_latency_ms`` (NaN where the forwards or costs are unknown)."""
    def known(value: object) -> float | None:
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    projected = []
    for row in rows:
        t, s = known(row.get("teacher_forwards_per_example")), known(row.get("student_forwards_per_example"))
        value = projected_latency_ms(t, s, costs) if costs is not None and t is not None and s is not None else math.nan
        projected.append({**row, "projected_latency_ms": value})
    return projected


def costs_measured_here(rows: Sequence[dict], label: str = "measured here") -> ForwardCosts | None:
    """Per-forward costs from the teacher-alone and student-alone rows of a `tw eval` run: each
    one's median latency over its forwards per example (None if either row or value is missing)."""
    def per_forward(method: str, forwards_key: str) -> float | None:
        for row in rows:
            latency, forwards = row.get("latency_ms_median"), row.get(forwards_key)
            if row.get("method") == method and latency is not None and forwards:
                value = float(latency) / float(forwards)
                return value if math.isfinite(value) and value > 0 else None
        return None

    teacher_ms = per_forward("teacher", "teacher_forwards_per_example")
    student_ms = per_forward("student", "student_forwards_per_example")
    if teacher_ms is None or student_ms is None:
        return None
    return ForwardCosts(teacher_ms, student_ms, label)


# ---------------------------------------------------------------------------------------------- one row of `tw eval`
@dataclass
class Setting:
    """One row of `tw eval`'s results: a method at one setting and how to decode a batch with it."""

    method: str
    setting: str  # a short label: "alone", "b=0.1", "K=5 l=0.3", "t=0.5"
    decode: Decode  # (input_ids, attention_mask[, teacher_input_ids, teacher_attention_mask]) -> DecodeResult
    budget: float | None = None  # None: the plain prompt
    lenience: float | None = None
    draft_length: int | None = None
    threshold: float | None = None
    budget_cap: str | None = None  # Training Wheels: "off", "rounded_up" or "guaranteed"; None for the other methods
    calibrated_for: float | None = None  # the target teacher fraction its threshold was calibrated to
    rollback_threshold: float | None = None  # BiLD's α_RB (its α_FB is ``threshold``)
    # Settings with the same key decode identically (one method's decoder at the same parameters, plain
    # prompt): `tw eval` decodes the first and copies its row for the others (:func:`evaluate_settings`).
    # A calibrated threshold often lands on a swept one (a target of 0, or a floor such as BiLD's
    # large-model first token that several targets hit). None: always decoded.
    decodes_like: tuple | None = None


def token_pieces(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """Display text of each output token (SentencePiece / Metaspace "▁" becomes a space)."""
    pieces = []
    for token_id, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        pieces.append(f"<{token_id}>" if piece is None else piece.replace("\u2581", " "))
    return pieces


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def time_batch_size_one(decode: Decode, prompts: list[Prompts], warmup: int, device: torch.device) -> dict[str, float]:
    """Median latency (ms) and per-example teacher/student forwards, one example at a time.

    ``prompts`` are single-example batches; the first ``warmup`` are decoded untimed.
    """
    for inputs in prompts[:warmup]:
        decode(*inputs)
    times, teacher_forwards, student_forwards = [], [], []
    for inputs in prompts[warmup:]:
        _sync(device)
        start = time.perf_counter()
        result = decode(*inputs)
        _sync(device)
        times.append(1000.0 * (time.perf_counter() - start))
        teacher_forwards.append(result.teacher_forwards)
        student_forwards.append(result.student_forwards)
    if not times:
        return {"latency_ms_median": math.nan, "latency_ms_mean": math.nan,
                "teacher_forwards_per_example": math.nan, "student_forwards_per_example": math.nan}
    return {
        "latency_ms_median": statistics.median(times), "latency_ms_mean": statistics.fmean(times),
        "teacher_forwards_per_example": statistics.fmean(teacher_forwards),
        "student_forwards_per_example": statistics.fmean(student_forwards),
    }


def evaluate_setting(
    setting: Setting, task: Task, examples: Sequence[Example], *, plain_prompt: str, batch_size: int,
    latency_examples: int, warmup: int, device: torch.device, device_name: str,
) -> tuple[dict, list[dict]]:
    """One row of `tw eval`: decode every example in batches (quality, teacher use, throughput), then
    time a few alone. Returns the row and one output record per example (with per-token provenance
    for Training Wheels, which ``tw plot`` shows)."""
    sources = [e.source for e in examples]
    encode = prompt_encoder(task, setting.budget, plain_prompt, device)
    batches = tqdm(in_batches(encode, sources, batch_size), total=math.ceil(len(sources) / batch_size),
                   desc=f"{setting.method} {setting.setting}", leave=False)
    decoded = decode_batches(setting.decode, batches, task.tokenizer, device)
    n, tokens, seconds = len(examples), decoded.tokens, decoded.seconds
    timed = [encode([s]) for s in sources[:latency_examples]]
    warm = [encode([s]) for s in sources[: min(warmup, n)]] if timed else []
    timing = time_batch_size_one(setting.decode, warm + timed, len(warm), device)
    row = {
        "method": setting.method, "setting": setting.setting, "budget": setting.budget,
        "lenience": setting.lenience, "draft_length": setting.draft_length, "threshold": setting.threshold,
        "quality": decoded.quality(task.metric, [e.reference for e in examples]), "metric": task.metric,
        "teacher_fraction": decoded.teacher_fraction, "wasted_per_example": decoded.wasted / n,
        "teacher_forwards_per_example": timing["teacher_forwards_per_example"],
        "latency_ms_median": timing["latency_ms_median"],
        "batched_tokens_per_s": tokens / seconds if seconds > 0 else math.nan,
        "examples": n, "device": device_name,
        "batched_examples_per_s": n / seconds if seconds > 0 else math.nan,
        "latency_ms_mean": timing["latency_ms_mean"], "latency_examples": len(timed),
        "output_tokens_per_example": tokens / n,
        "student_forwards_per_example": timing["student_forwards_per_example"],
        "budget_cap": setting.budget_cap, "calibrated_for": setting.calibrated_for,
        "rollback_threshold": setting.rollback_threshold,
    }
    return row, _output_records(setting, task, examples, decoded)


def evaluate_settings(
    settings: Iterable[Setting], evaluate_one: Callable[[Setting], tuple[dict, list[dict]]],
) -> Iterator[tuple[dict, list[dict]]]:
    """Each setting's (row, output records) from ``evaluate_one`` (:func:`evaluate_setting`), in order, except
    that a setting whose ``decodes_like`` key an earlier one had gets that one's row and records under its
    own label (``setting``, ``calibrated_for``): the same decoder at the same parameters gives the same
    outputs, so decoding it again would only re-measure latency."""
    first: dict[tuple, tuple[dict, list[dict]]] = {}
    for setting in settings:
        key = setting.decodes_like
        if key is not None and key in first:
            row, records = first[key]
            label = {"setting": setting.setting}
            yield {**row, **label, "calibrated_for": setting.calibrated_for}, [{**r, **label} for r in records]
            continue
        row, records = evaluate_one(setting)
        if key is not None:
            first[key] = (row, records)
        yield row, records


def _output_records(setting: Setting, task: Task, examples: Sequence[Example], decoded: Decoded) -> list[dict]:
    """outputs.jsonl's records of one row: every output text; per-token provenance for Training Wheels."""
    records = []
    outputs = zip(examples, decoded.texts, decoded.output_ids, decoded.from_teacher, strict=True)
    for index, (example, text, ids, flags) in enumerate(outputs):
        record = {"method": setting.method, "setting": setting.setting, "index": index, "output": text}
        if setting.method == "training_wheels":
            record.update({
                "budget": setting.budget, "budget_cap": setting.budget_cap, "calibrated_for": setting.calibrated_for,
                "source": example.source, "reference": example.reference,
                "token_ids": ids, "tokens": token_pieces(task.tokenizer, ids), "from_teacher": flags,
                "teacher_fraction": sum(flags) / len(flags) if flags else 0.0,
            })
        records.append(record)
    return records
