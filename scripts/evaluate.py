"""`tw eval`: output quality, teacher use, wasted tokens and latency of every decoding method.

The methods (the paper's §3.1 and Figures 1–2, plus two reference points):

- ``student``: the plain student alone (greedy ``generate``), prompt ``"{instruction}: {source}"``.
- ``teacher``: the teacher alone, same prompt.
- ``training_wheels``: a trained :class:`~agents.policy.StudentPolicy` that calls the teacher with
  <τ> (:func:`~agents.decoding.teacher_help_decode`), one row per budget, prompted with the budget
  keyword of Table 1 (``"With {keyword} teacher use, {instruction}: {source}"``). ``budget_cap``
  optionally adds a hard cap at b: ``"rounded_up"`` (⌈b·n⌉ calls in every prefix; a short output
  may exceed b by less than one call) or ``"guaranteed"`` (⌊b·n⌋; every output's teacher fraction
  ≤ b). The rule is the ``budget_cap`` column of every Training Wheels row, and a guaranteed cap
  is also in its setting label (``"b=0.1 guaranteed cap"``). With ``tw_calibrate`` it also gets one
  row per budget whose call threshold c (call iff π(<τ>) > c; the policy's own rule is c = ½) is
  calibrated on the calibration examples so that teacher use lands at b (setting
  ``"b=0.2 calibrated c=0.31"``, ``calibrated_for`` = b), beyond the paper and the same calibration
  the fallback gets. With ``tw_policy_candidates`` those rows use the candidate policy (``tw_policy``
  among them) that ``tw train``'s selection rule prefers at its calibrated thresholds on the
  calibration examples (every |f − b| ≤ ``calibration_delta``, then the best mean quality); every
  threshold tried, its teacher fraction and quality are in results.json (``tw_calibration``).
- ``distillspec``: lossy greedy speculative decoding (Appendix 5.3, Algorithm 1) with the GKD
  draft model (``tw gkd``), one row per draft length × lenience; plain prompt.
- ``speculative``: the same decoder with the plain student as the draft (no GKD); run by default
  only when no GKD draft is given.
- ``kl_oracle`` (only when listed in ``methods``, with ``training_wheels``): a reference for the
  call ranking, not a decoder one can deploy. The Training Wheels policy's tokens (the calibrated
  rows' policy with ``tw_calibrate``) with the teacher writing a token wherever KL(p ‖ π_V) at the
  current prefix exceeds a threshold calibrated to each budget on the calibration examples (the
  Phase-1 oracle's ranking applied online); it runs the teacher at every token. Setting
  ``"b=0.2 KL>0.8"``; the search is in results.json (``kl_oracle_calibration``).
- ``fallback``: Big Little Decoder's confidence fallback, one row per threshold; plain prompt. With
  ``fallback_targets`` it also gets one row per target teacher fraction, its threshold calibrated
  on ``calibration_examples`` of ``calibration_split`` (a seeded random subset, by default the
  validation examples checkpoint selection reads) so that its teacher use lands at the target, as
  Co-LLM calibrates its deferral threshold per fraction: the matched comparison with Training
  Wheels at each budget. The thresholds tried are in results.json (``fallback_calibration``).

What is measured for each method and setting:

- ``quality``: the task's metric (BLEU or ROUGE-2) over ``examples`` examples, decoded in batches.
- ``teacher_fraction``: Σ teacher tokens / Σ output tokens (token level, over the whole set).
- ``wasted_per_example``: rejected draft tokens per example (speculative decoding only).
- ``teacher_forwards_per_example``: teacher decoder forwards per example at batch size 1, over the
  timed examples (blank when ``latency_examples`` is 0).
- ``latency_ms_median``: median wall time of one example decoded alone (batch size 1), over
  ``latency_examples`` examples after ``warmup`` untimed ones; prompts are tokenised beforehand and
  ``torch.cuda.synchronize()`` runs before every clock read on a GPU.
- ``batched_tokens_per_s`` / ``batched_examples_per_s``: throughput of the batched quality run at
  ``batch_size`` (output tokens, including EOS, and examples per second of decoding).
- ``projected_latency_ms``: a latency *projection* from the cost model
  (:class:`~agents.evaluation.ForwardCosts`): teacher forwards × ``teacher_forward_ms`` + student
  forwards × ``student_forward_ms`` per example. Without given costs it uses the costs measured
  here (the teacher-alone and student-alone rows' latency per forward), which checks the model
  against the measured latency; given costs (e.g. an H100's) project to other hardware, and
  ``cost_label`` says which. ``tw plot`` draws it beside the measured latency, labelled a projection.

Files written to ``output_dir``: ``results.json`` (config, device, rows), ``results.csv`` (one row per
method × setting), ``outputs.jsonl`` (every output text; per-token provenance, source and reference
for the Training Wheels rows, which ``tw plot`` turns into the token view).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

import tw_env  # noqa: F401  (registers the tasks)
from agents.run import start_run
from tw_env.atomic import write_json
from tw_env.metrics import quality
from tw_env.models import load_model
from tw_env.prompts import BUDGETS, PLAIN_TEMPLATE, check_template, keyword_for
from tw_env.registration import make_task, split_env_options
from tw_env.task import Task
from tw_env.tasks import Example

METHODS = ("student", "teacher", "training_wheels", "distillspec", "speculative", "fallback", "kl_oracle")
BUDGET_CAPS = ("off", "rounded_up", "guaranteed")  # "off", then agents.objectives.CAP_RULES
# Configs written when budget_cap was a bool (JSON true/false, or `--budget-cap true` on the command line).
_LEGACY_BUDGET_CAPS = {True: "rounded_up", False: "off", "true": "rounded_up", "false": "off"}
PLAIN_PROMPT = PLAIN_TEMPLATE

CSV_COLUMNS = [
    "method", "setting", "budget", "lenience", "draft_length", "threshold", "quality", "metric",
    "teacher_fraction", "wasted_per_example", "teacher_forwards_per_example", "latency_ms_median",
    "batched_tokens_per_s", "examples", "device",
    # Beyond the columns the figures need:
    "batched_examples_per_s", "latency_ms_mean", "latency_examples", "output_tokens_per_example",
    "student_forwards_per_example", "budget_cap", "calibrated_for", "projected_latency_ms",
]


@dataclass
class EvalConfig:
    """Quality, teacher use, wasted tokens and latency of every method (`tw eval`)."""

    env_id: str = "TrainingWheels-Synthetic-v0"  # a registered Training Wheels task (teacher, data, metric)
    env_kwargs: dict = field(default_factory=dict)  # overrides for gym.make: teacher, student, tokenizer, data, dtype, ...
    split: str = "test"  # the task's split to evaluate on
    examples: int = 512  # how many examples: the first N of the split
    device: str = "auto"  # "cpu", "cuda" or "auto"
    threads: int = 0  # torch CPU threads (0: torch's default)
    max_new_tokens: int | None = None  # output length limit (None: the task's)
    output_dir: str = "runs/eval"  # results.json, results.csv and outputs.jsonl go here
    methods: list | None = None  # among student, teacher, training_wheels, distillspec, speculative, fallback, kl_oracle (None: all available but kl_oracle)
    tw_policy: str | None = None  # a trained Training Wheels policy directory (e.g. runs/tw/best)
    budgets: list = field(default_factory=lambda: list(BUDGETS))  # Training Wheels budgets (Table 1 keywords)
    budget_cap: str = "off"  # Training Wheels hard cap at b: "off"; "rounded_up" (<= ceil(b*n) calls in every prefix, a short output may exceed b by under one call); "guaranteed" (<= floor(b*n): every output's teacher fraction <= b). true/false mean rounded_up/off
    student: str | None = None  # plain student for the student-alone and speculative rows (None: the task's student)
    draft: str | None = None  # DistillSpec's GKD draft model directory (tw gkd's OUTPUT_DIR/best)
    lenience: list = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])  # speculative lenience values l
    draft_lengths: list = field(default_factory=lambda: [3, 5, 10])  # speculative draft lengths K
    fallback_student: str | None = None  # model of the fallback decoder (None: the draft if given, else the student)
    thresholds: list = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])  # fallback confidence thresholds
    plain_prompt: str = PLAIN_PROMPT  # prompt of every method except Training Wheels (no budget keyword)
    batch_size: int = 32  # batch size of the quality / teacher-use / throughput run
    latency_examples: int = 64  # examples timed one at a time (batch size 1); 0 skips latency
    warmup: int = 3  # untimed batch-size-1 examples before the timed ones
    fallback_targets: list = field(default_factory=list)  # teacher fractions the fallback is calibrated to (one row each; [] for none)
    calibration_split: str = "validation"  # split whose examples the fallback thresholds are calibrated on (never the evaluated one)
    calibration_examples: int = 512  # a seeded random subset of calibration_split (checkpoint selection's, with the same seed)
    calibration_seed: int = 0  # seeds that subset (tw train's seed selects the same examples)
    calibration_tolerance: float = 0.005  # stop calibrating once the teacher fraction is this close to its target
    tw_calibrate: bool = False  # also one Training Wheels row per budget with its call threshold calibrated to b on calibration_split
    tw_policy_candidates: list = field(default_factory=list)  # policy directories (or glob patterns, e.g. runs/tw/phase2-evaluated/step-*) the calibrated rows choose from (with tw_policy), by tw train's rule on calibration_split
    calibration_delta: float = 0.02  # choosing among candidates: a calibrated policy meets its budgets when every |f - b| <= this
    teacher_forward_ms: float | None = None  # cost model: one teacher forward (None: measured here from the teacher-alone row)
    student_forward_ms: float | None = None  # cost model: one student forward (None: measured here from the student-alone row)
    cost_label: str = ""  # where given per-forward costs come from (e.g. "H100, FLAN-T5-XL / -small, bf16")

    def __post_init__(self) -> None:
        # Booleans of configs older than the two rules; anything else is left to validate().
        if isinstance(self.budget_cap, bool) or str(self.budget_cap).lower() in ("true", "false"):
            self.budget_cap = _LEGACY_BUDGET_CAPS[
                self.budget_cap if isinstance(self.budget_cap, bool) else self.budget_cap.lower()
            ]

    def validate(self) -> None:
        if self.budget_cap not in BUDGET_CAPS:
            raise ValueError(
                f"budget_cap must be one of {list(BUDGET_CAPS)} (or true/false for rounded_up/off), "
                f"got {self.budget_cap!r}"
            )
        if self.examples < 1 or self.batch_size < 1:
            raise ValueError(f"examples and batch_size must be >= 1, got {self.examples} and {self.batch_size}")
        if self.latency_examples < 0 or self.warmup < 0 or self.threads < 0:
            raise ValueError("latency_examples, warmup and threads must be >= 0")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.methods is not None:
            unknown = [m for m in self.methods if m not in METHODS]
            if unknown or not self.methods:
                raise ValueError(f"unknown methods {unknown}; expected a non-empty list from {list(METHODS)}")
            if "training_wheels" in self.methods and not self.tw_policy:
                raise ValueError("method 'training_wheels' needs --tw-policy DIR (a trained policy, e.g. runs/tw/best)")
            if "kl_oracle" in self.methods and "training_wheels" not in self.methods:
                raise ValueError("method 'kl_oracle' reuses the Training Wheels policy: list 'training_wheels' too")
            if "distillspec" in self.methods and not self.draft:
                raise ValueError("method 'distillspec' needs --draft DIR (the GKD draft model, e.g. runs/gkd/best)")
        for b in self.budgets:
            keyword_for(b)  # raises for a budget without a Table 1 keyword
        if any(not 0.0 <= float(x) <= 1.0 for x in self.lenience):
            raise ValueError(f"lenience values must lie in [0, 1], got {self.lenience}")
        if any(int(k) < 1 for k in self.draft_lengths):
            raise ValueError(f"draft lengths must be >= 1, got {self.draft_lengths}")
        if any(float(t) < 0 for t in self.thresholds):
            raise ValueError(f"thresholds must be >= 0, got {self.thresholds}")
        check_template(self.plain_prompt, "plain_prompt")
        if any(not 0.0 <= float(b) <= 1.0 for b in self.fallback_targets):
            raise ValueError(f"fallback_targets must be teacher fractions in [0, 1], got {self.fallback_targets}")
        if self.tw_policy_candidates and not self.tw_calibrate:
            raise ValueError("tw_policy_candidates are chosen among by calibrated quality: set tw_calibrate too")
        if self.tw_calibrate and not self.tw_policy:
            raise ValueError("tw_calibrate calibrates a Training Wheels policy: pass --tw-policy DIR as well")
        calibrates = self.fallback_targets or self.tw_calibrate or "kl_oracle" in (self.methods or [])
        if calibrates and self.calibration_split == self.split:
            raise ValueError(f"calibration_split {self.calibration_split!r} is the evaluated split; calibrate on "
                             "another one (e.g. validation) so that the results stay held out")
        if self.calibration_examples < 1 or self.calibration_tolerance < 0 or self.calibration_delta < 0:
            raise ValueError("calibration_examples must be >= 1, calibration_tolerance and calibration_delta >= 0")
        from agents.evaluation import given_forward_costs

        given_forward_costs(self.teacher_forward_ms, self.student_forward_ms, self.cost_label)  # raises if half given

    def selected_methods(self) -> list[str]:
        if self.methods is not None:
            return list(self.methods)
        methods = ["student", "teacher"]
        if self.tw_policy:
            methods.append("training_wheels")
        methods.append("distillspec" if self.draft else "speculative")
        methods.append("fallback")
        return methods


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class Setting:
    """One row of the results: a method with its parameters and how to decode a batch with it."""

    method: str
    setting: str  # a short label: "alone", "b=0.1", "K=5 l=0.3", "t=0.5"
    decode: Callable  # (input_ids, attention_mask[, teacher_input_ids, teacher_attention_mask]) -> DecodeResult
    budget: float | None = None  # None: the plain prompt
    lenience: float | None = None
    draft_length: int | None = None
    threshold: float | None = None
    budget_cap: str | None = None  # Training Wheels: "off", "rounded_up" or "guaranteed"; None for the other methods
    calibrated_for: float | None = None  # the target teacher fraction its threshold was calibrated to (fallback, Training Wheels)


def build_settings(config: EvalConfig, task: Task, device: torch.device,
                   calibrations: list | None = None, tw_calibration: dict | None = None) -> list[Setting]:
    """Load the models the selected methods need (each once) and list every method × setting.

    The fallback's calibrated thresholds are found here (on ``config.calibration_split``); each
    :class:`~agents.evaluation.Calibration` is appended to ``calibrations``. Training Wheels'
    calibrated call thresholds (``config.tw_calibrate``) are reported into ``tw_calibration``."""
    from agents.decoding import (
        confidence_fallback_decode,
        generate_alone,
        speculative_decode,
        teacher_help_decode,
    )
    from agents.policy import StudentPolicy

    methods = config.selected_methods()
    teacher, max_new = task.teacher, task.max_new_tokens
    dtype = config.env_kwargs.get("dtype")
    loaded: dict[str, torch.nn.Module] = {}

    def model(source, role: str):
        if isinstance(source, torch.nn.Module):
            return source
        if source is None:
            raise ValueError(f"no {role} model: pass --{role.replace('_', '-')} (a directory or hub id)")
        key = str(source)
        if key not in loaded:
            loaded[key] = load_model(key, role=role, device=device, dtype=dtype)
        return loaded[key]

    student_source = config.student or task.student
    settings: list[Setting] = []
    calibration_rows: list[CalibrationRows] = []  # built on first use, shared by every calibration

    def calibration() -> CalibrationRows:
        if not calibration_rows:
            calibration_rows.append(CalibrationRows(config, device, teacher))
        return calibration_rows[0]

    for method in methods:
        if method == "student":
            student = model(student_source, "student")
            settings.append(Setting("student", "alone", lambda i, m, s=student: generate_alone(s, i, m, max_new)))
        elif method == "teacher":
            settings.append(Setting(
                "teacher", "alone", lambda i, m: generate_alone(teacher, i, m, max_new, is_teacher=True)))
        elif method == "training_wheels":
            policy = StudentPolicy.load(config.tw_policy, device=device, dtype=dtype).eval()
            capped = config.budget_cap != "off"
            rule = config.budget_cap if capped else "rounded_up"  # the rule is unused without a cap
            suffix = " guaranteed cap" if config.budget_cap == "guaranteed" else ""

            def training_wheels(b: float, p: StudentPolicy, c: float = 0.5, capped: bool = capped,
                                rule: str = rule) -> Callable:
                cap = b if capped else None
                return lambda i, m, ti, tm: teacher_help_decode(
                    p, teacher, i, m, max_new, budget_cap=cap, teacher_input_ids=ti, teacher_attention_mask=tm,
                    cap_rule=rule, call_threshold=c)

            for b in config.budgets:
                settings.append(Setting("training_wheels", f"b={float(b):g}{suffix}", training_wheels(float(b), policy),
                                        budget=float(b), budget_cap=config.budget_cap))
            if config.tw_calibrate:
                candidates = {config.tw_policy: policy}
                for source in expand_candidates(config.tw_policy_candidates):
                    candidates.setdefault(str(source), StudentPolicy.load(source, device=device, dtype=dtype).eval())
                report = calibrate_training_wheels(config, candidates, training_wheels, calibration())
                if tw_calibration is not None:
                    tw_calibration.update(report)
                chosen = candidates[report["chosen"]]
                for found in report["calibrations"]:
                    settings.append(Setting(
                        "training_wheels", f"b={found.target:g}{suffix} calibrated c={found.threshold:.3g}",
                        training_wheels(found.target, chosen, found.threshold), budget=found.target,
                        threshold=found.threshold, budget_cap=config.budget_cap, calibrated_for=found.target))
            if "kl_oracle" in methods:  # the reference: the same policy's tokens, the KL oracle choosing the calls
                oracle_policy = chosen if config.tw_calibrate else policy
                settings += kl_oracle_settings(oracle_policy, teacher, max_new, calibration(), tw_calibration)
        elif method == "kl_oracle":
            continue  # built with training_wheels, whose policy it uses
        elif method in ("distillspec", "speculative"):
            draft = model(config.draft if method == "distillspec" else student_source,
                          "draft" if method == "distillspec" else "student")
            for k in config.draft_lengths:
                for lenience in config.lenience:
                    settings.append(Setting(
                        method, f"K={int(k)} l={float(lenience):g}",
                        lambda i, m, d=draft, k=int(k), lv=float(lenience): speculative_decode(
                            d, teacher, i, m, max_new, lenience=lv, draft_length=k),
                        lenience=float(lenience), draft_length=int(k)))
        elif method == "fallback":
            source = config.fallback_student or config.draft or student_source
            fallback_model = model(source, "fallback_student")
            def fallback(threshold: float, f=fallback_model) -> Callable:
                return lambda i, m: confidence_fallback_decode(f, teacher, i, m, max_new, threshold=threshold)

            for t in config.thresholds:
                settings.append(Setting("fallback", f"t={float(t):g}", fallback(float(t)), threshold=float(t)))
            for found in calibrate_fallback(config, fallback, calibration) if config.fallback_targets else []:
                if calibrations is not None:
                    calibrations.append(found)
                settings.append(Setting("fallback", f"t={found.threshold:.3g} (for {found.target:g})",
                                        fallback(found.threshold), threshold=found.threshold,
                                        calibrated_for=found.target))
    return settings


def calibrate_fallback(config: EvalConfig, fallback: Callable[[float], Callable],
                       calibration: Callable[[], CalibrationRows]) -> list:
    """One calibrated threshold per ``config.fallback_targets``, on the calibration examples (plain prompt)."""
    from agents.evaluation import calibrate_threshold

    rows = calibration()
    prompts = rows.prompts(lambda chunk: rows.task.plain_prompts(chunk, config.plain_prompt, rows.device))
    measured: dict[float, tuple[float, float]] = {}  # shared by the targets: a threshold is decoded once

    def teacher_fraction_at(threshold: float) -> float:
        return rows.measure(fallback(threshold), prompts, measured, threshold)

    return [calibrate_threshold(teacher_fraction_at, float(target), tolerance=config.calibration_tolerance)
            for target in tqdm(config.fallback_targets, desc=f"calibrating the fallback on {config.calibration_split}")]


def expand_candidates(entries: Sequence[str]) -> list[str]:
    """``tw_policy_candidates`` as directories: a glob pattern (``*``, ``?``, ``[``) becomes its matches in
    sorted order (``tw train``'s ``phase2-evaluated/step-NNNNNN`` sort by step); a pattern that matches
    nothing is an error, not an empty choice."""
    out: list[str] = []
    for entry in map(str, entries):
        if any(c in entry for c in "*?["):
            matches = sorted(glob.glob(entry))
            if not matches:
                raise FileNotFoundError(f"tw_policy_candidates pattern {entry!r} matches no directory; expected "
                                        "policy directories (e.g. tw train's OUTPUT_DIR/phase2-evaluated/step-*)")
            out += [m for m in matches if m not in out]
        elif entry not in out:
            out.append(entry)
    return out


def weights_digest(policy_dir: str | Path) -> str:
    """SHA-256 over a policy directory's safetensors files (names and bytes): equal digests, equal policies."""
    digest = hashlib.sha256()
    for file in sorted(Path(policy_dir).glob("*.safetensors")):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def calibrate_training_wheels(config: EvalConfig, candidates: dict, training_wheels: Callable,
                              calibration: CalibrationRows) -> dict:
    """Each candidate policy's call threshold per budget, calibrated on the calibration examples
    (:func:`~agents.evaluation.calibrate_call_threshold`), and the candidate that ``tw train``'s
    selection rule (:func:`~agents.evaluation.is_better_selection`, budgets as targets within
    ``calibration_delta``) prefers at its calibrated thresholds there: a policy whose calibration
    cannot reach some budget loses to one that can, whatever its quality. Validation data only: the
    evaluated split is never read.

    A candidate with the same weights as an earlier one (:func:`weights_digest`) reuses its
    calibration instead of decoding again, and says so (``same_weights_as``).

    Returns {"chosen": source, "calibrations": [Calibration per budget of the chosen one],
    "candidates": [{"policy", "meets_budgets", "worst_violation", "mean_quality", "budgets":
    [{budget, threshold, teacher_fraction, quality, tried: [[c, fraction, quality], ...]}]}]}."""
    from agents.evaluation import (
        BudgetResult,
        calibrate_call_threshold,
        is_better_selection,
        selection_record,
    )

    report: dict = {"split": config.calibration_split, "examples": len(calibration.references), "candidates": []}
    found_by_source: dict[str, list] = {}
    first_with_weights: dict[str, str] = {}  # weights digest -> the first candidate that has them
    for source, policy in candidates.items():
        same = first_with_weights.setdefault(weights_digest(source), source)
        extra: dict = {}
        if same != source:  # e.g. tw train's best/ is also one of its phase2-evaluated/step-N: decoding is deterministic
            found_by_source[source] = found_by_source[same]
            entries = next(c["budgets"] for c in report["candidates"] if c["policy"] == same)
            extra = {"same_weights_as": same}
        else:
            found_by_source[source], entries = calibration.per_budget(
                partial(_with_policy, training_wheels, policy), calibrate_call_threshold, f"calibrating {source}")
        record = selection_record([BudgetResult(e["budget"], e["teacher_fraction"], e["quality"], len(calibration.references))
                                   for e in entries], config.calibration_delta, ceiling=False)
        report["candidates"].append({"policy": source, **{k: record[k] for k in ("meets_budgets", "worst_violation",
                                                                                 "mean_quality")}, "budgets": entries,
                                     **extra})
    best = report["candidates"][0]  # tw_policy: it wins ties
    for entry in report["candidates"][1:]:
        best = entry if is_better_selection(entry, best) else best
    report["chosen"] = best["policy"]
    report["calibrations"] = found_by_source[best["policy"]]
    return report


def kl_oracle_settings(policy, teacher, max_new: int, calibration: CalibrationRows,
                       reports: dict | None) -> list[Setting]:
    """One ``kl_oracle`` row per budget: the policy's tokens, but the teacher writes a token wherever
    KL(p ‖ π_V) exceeds a threshold calibrated to b on the calibration examples
    (:func:`~agents.evaluation.calibrate_kl_threshold`). A reference for the call ranking, not a
    decoder: it runs the teacher at every token. The search is reported under ``reports["kl_oracle"]``."""
    from agents.decoding import teacher_help_decode
    from agents.evaluation import calibrate_kl_threshold

    def kl_oracle(b: float, k: float) -> Callable:
        return lambda i, m, ti, tm: teacher_help_decode(
            policy, teacher, i, m, max_new, teacher_input_ids=ti, teacher_attention_mask=tm, kl_oracle_threshold=k)

    found_list, entries = calibration.per_budget(kl_oracle, calibrate_kl_threshold, "calibrating the KL oracle")
    if reports is not None:
        reports["kl_oracle"] = entries
    return [Setting("kl_oracle", f"b={found.target:g} KL>{found.threshold:.3g}", kl_oracle(found.target, found.threshold),
                    budget=found.target, threshold=found.threshold, calibrated_for=found.target)
            for found in found_list]


def _with_policy(training_wheels: Callable, policy, budget: float, threshold: float) -> Callable:
    return training_wheels(budget, policy, threshold)


def _encode_budget_chunk(task: Task, budget: float, device: torch.device, chunk: list[str]) -> tuple:
    return encode_budget(task, chunk, budget, device)


class CalibrationRows:
    """The calibration examples (``calibration_examples`` of ``calibration_split``, seeded; the
    evaluated task's teacher, not a second copy) and the threshold searches on them."""

    def __init__(self, config: EvalConfig, device: torch.device, teacher) -> None:
        from agents.evaluation import seeded_subset

        self.config, self.device = config, device
        self.task = make_eval_task(config, device, split=config.calibration_split, teacher=teacher)
        examples = seeded_subset(self.task.examples, min(config.calibration_examples, len(self.task.examples)),
                                 config.calibration_seed)
        self.sources, self.references = [e.source for e in examples], [e.reference for e in examples]

    def prompts(self, encode: Callable[[list[str]], tuple]) -> list[tuple]:
        """The calibration sources in batches of ``batch_size``, encoded by ``encode``."""
        size = self.config.batch_size
        return [encode(self.sources[s : s + size]) for s in range(0, len(self.sources), size)]

    def measure(self, decode: Callable, prompts: list[tuple], measured: dict, threshold: float) -> float:
        """Teacher fraction of ``decode`` over ``prompts``; (fraction, quality) cached in ``measured``
        by threshold, so that a threshold is decoded once."""
        if threshold not in measured:
            calls, tokens, texts = 0, 0, []
            for inputs in prompts:
                result = decode(*inputs)
                calls, tokens = calls + sum(result.teacher_calls), tokens + sum(result.lengths)
                texts += self.task.tokenizer.batch_decode(result.output_ids, skip_special_tokens=True)
            measured[threshold] = (calls / max(tokens, 1), quality(self.task.metric, texts, self.references))
        return measured[threshold][0]

    def per_budget(self, decoder: Callable[[float, float], Callable], calibrate: Callable, desc: str) -> tuple[list, list]:
        """For each budget b of the config, ``calibrate(fraction_at, b, tolerance=…)`` with
        ``decoder(b, threshold)`` decoding the budget-b prompts. Returns the Calibrations and, per
        budget, {budget, threshold, teacher_fraction, quality, tried: [[threshold, fraction, quality], …]}."""
        config = self.config
        found_list, entries = [], []
        for b in tqdm([float(b) for b in config.budgets], desc=f"{desc} on {config.calibration_split}"):
            prompts = self.prompts(partial(_encode_budget_chunk, self.task, b, self.device))
            measured: dict[float, tuple[float, float]] = {}  # threshold -> (teacher fraction, quality)

            def teacher_fraction_at(threshold: float, b=b, prompts=prompts, measured=measured) -> float:
                return self.measure(decoder(b, threshold), prompts, measured, threshold)

            found = calibrate(teacher_fraction_at, b, tolerance=config.calibration_tolerance)
            found_list.append(found)
            entries.append({
                "budget": b, "threshold": found.threshold, "teacher_fraction": found.teacher_fraction,
                "quality": measured[found.threshold][1],
                "tried": [[c, f, measured[c][1]] for c, f in found.tried]})
        return found_list, entries


# ---------------------------------------------------------------------------------------------- prompts
def encode_budget(task: Task, sources: list[str], budget: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The Training Wheels prompts Y (ids, mask), then the teacher's prompts C^(T) (ids, mask)."""
    budgets = [budget] * len(sources)
    return (*task.prompts(sources, budgets, device), *task.teacher_prompts(sources, budgets, device))


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Display text of each output token (SentencePiece / Metaspace "▁" becomes a space)."""
    pieces = []
    for token_id, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        pieces.append(f"<{token_id}>" if piece is None else piece.replace("\u2581", " "))
    return pieces


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batch_size_one(setting: Setting, prompts: list[tuple[torch.Tensor, ...]], warmup: int,
                        device: torch.device) -> dict:
    """Median latency (ms) and per-example teacher/student forwards, one example at a time.

    ``prompts`` are single-example batches; the first ``warmup`` are decoded untimed.
    """
    for inputs in prompts[:warmup]:
        setting.decode(*inputs)
    times, teacher_forwards, student_forwards = [], [], []
    for inputs in prompts[warmup:]:
        _sync(device)
        start = time.perf_counter()
        result = setting.decode(*inputs)
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


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


# ---------------------------------------------------------------------------------------------- run
def make_eval_task(config: EvalConfig, device: torch.device, split: str | None = None, teacher=None) -> Task:
    """The task of ``config.env_id`` on the evaluated split, or on ``split`` (env options in ``env_kwargs``
    are ignored); ``teacher``: an already loaded teacher to reuse instead of loading it again."""
    _, task_kwargs = split_env_options(dict(config.env_kwargs))
    task_kwargs.setdefault("device", str(device))
    if teacher is not None:
        task_kwargs["teacher"] = teacher
    if config.max_new_tokens is not None:
        task_kwargs["max_new_tokens"] = config.max_new_tokens
    return make_task(config.env_id, **{**task_kwargs, "split": split or config.split})


def evaluate_setting(setting: Setting, task: Task, examples: list[Example], config: EvalConfig, device: torch.device,
                     device_name: str) -> tuple[dict, list[dict]]:
    """Decode every example in batches (quality, teacher use, throughput), then time a few alone."""
    sources = [e.source for e in examples]

    def encode(chunk: list[str]):
        if setting.budget is None:
            return task.plain_prompts(chunk, config.plain_prompt, device)
        return encode_budget(task, chunk, setting.budget, device)

    outputs, texts, calls, tokens, wasted, seconds = [], [], 0, 0, 0, 0.0
    batches = range(0, len(sources), config.batch_size)
    for start in tqdm(batches, desc=f"{setting.method} {setting.setting}", leave=False):
        inputs = encode(sources[start : start + config.batch_size])
        _sync(device)
        t0 = time.perf_counter()
        result = setting.decode(*inputs)
        _sync(device)
        seconds += time.perf_counter() - t0
        calls += sum(result.teacher_calls)
        tokens += sum(result.lengths)
        wasted += sum(result.wasted_tokens)
        texts += task.tokenizer.batch_decode(result.output_ids, skip_special_tokens=True)
        outputs += list(zip(result.output_ids, result.from_teacher, strict=True))
    n = len(examples)
    timed = [encode([s]) for s in sources[: config.latency_examples]]
    warm = [encode([s]) for s in sources[: min(config.warmup, n)]] if timed else []
    timing = time_batch_size_one(setting, warm + timed, len(warm), device)
    row = {
        "method": setting.method, "setting": setting.setting, "budget": setting.budget,
        "lenience": setting.lenience, "draft_length": setting.draft_length, "threshold": setting.threshold,
        "quality": quality(task.metric, texts, [e.reference for e in examples]), "metric": task.metric,
        "teacher_fraction": calls / max(tokens, 1), "wasted_per_example": wasted / n,
        "teacher_forwards_per_example": timing["teacher_forwards_per_example"],
        "latency_ms_median": timing["latency_ms_median"],
        "batched_tokens_per_s": tokens / seconds if seconds > 0 else math.nan,
        "examples": n, "device": device_name,
        "batched_examples_per_s": n / seconds if seconds > 0 else math.nan,
        "latency_ms_mean": timing["latency_ms_mean"], "latency_examples": len(timed),
        "output_tokens_per_example": tokens / n,
        "student_forwards_per_example": timing["student_forwards_per_example"],
        "budget_cap": setting.budget_cap, "calibrated_for": setting.calibrated_for,
    }
    records = []
    for index, (example, text, (ids, flags)) in enumerate(zip(examples, texts, outputs, strict=True)):
        record = {"method": setting.method, "setting": setting.setting, "index": index, "output": text}
        if setting.method == "training_wheels":
            record.update({
                "budget": setting.budget, "budget_cap": setting.budget_cap, "calibrated_for": setting.calibrated_for,
                "source": example.source, "reference": example.reference,
                "token_ids": ids, "tokens": token_pieces(task.tokenizer, ids), "from_teacher": flags,
                "teacher_fraction": sum(flags) / len(flags) if flags else 0.0,
            })
        records.append(record)
    return row, records


def run(config: EvalConfig) -> dict:
    """Evaluate every selected method × setting; write results.json/.csv and outputs.jsonl; return the results."""
    run_ = start_run(config, config.output_dir)
    device = run_.device
    task = make_eval_task(config, device)
    examples = task.examples[: config.examples]
    calibrations: list = []
    tw_calibration: dict = {}
    settings = build_settings(config, task, device, calibrations, tw_calibration)
    device_name = describe_device(device)
    out = Path(config.output_dir)
    rows = []
    with open(out / "outputs.jsonl", "w") as outputs_file:
        for setting in tqdm(settings, desc="methods x settings"):
            row, records = evaluate_setting(setting, task, examples, config, device, device_name)
            rows.append(row)
            outputs_file.writelines(json.dumps(r) + "\n" for r in records)
    costs = add_projection(rows, config)
    results = {
        "config": dataclasses.asdict(config), "env_id": config.env_id, "split": config.split,
        "metric": task.metric, "examples": len(examples), "max_new_tokens": task.max_new_tokens,
        "device": device_name, "torch": torch.__version__, "rows": [_json_safe(r) for r in rows],
        "cost_model": dataclasses.asdict(costs) if costs else None,
        "fallback_calibration": [dataclasses.asdict(c) for c in calibrations],
        "kl_oracle_calibration": tw_calibration.pop("kl_oracle", None),
        "tw_calibration": {k: v for k, v in tw_calibration.items() if k != "calibrations"} or None,
    }
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", rows)
    print(format_table(rows))
    print(f"wrote {out / 'results.json'}, {out / 'results.csv'} and {out / 'outputs.jsonl'}")
    return results


def add_projection(rows: list[dict], config: EvalConfig):
    """Each row's ``projected_latency_ms`` under the given per-forward costs, else those measured
    here; returns the :class:`~agents.evaluation.ForwardCosts` used (None: no costs to project with)."""
    from agents.evaluation import costs_measured_here, given_forward_costs, with_projected_latency

    costs = given_forward_costs(config.teacher_forward_ms, config.student_forward_ms, config.cost_label)
    if costs is None:
        costs = costs_measured_here(rows, "measured here (teacher- and student-alone latency per forward)")
    rows[:] = with_projected_latency(rows, costs)
    return costs


# ---------------------------------------------------------------------------------------------- output
def _finite(value) -> bool:
    return not (isinstance(value, float) and not math.isfinite(value))


def _json_safe(row: dict) -> dict:
    return {k: (v if _finite(v) else None) for k, v in row.items()}


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None or not _finite(row.get(k)) else row.get(k)) for k in CSV_COLUMNS})


def format_table(rows: list[dict]) -> str:
    """A plain-text table of the main columns."""
    header = ["method", "setting", "quality", "teacher%", "wasted/ex", "T-fwd/ex", "latency ms", "projected ms", "tok/s"]

    def cell(value, fmt: str) -> str:
        return "-" if value is None or not _finite(value) else format(value, fmt)

    lines = [[r["method"], r["setting"], cell(r["quality"], ".2f"), cell(100 * r["teacher_fraction"], ".1f"),
              cell(r["wasted_per_example"], ".2f"), cell(r["teacher_forwards_per_example"], ".2f"),
              cell(r["latency_ms_median"], ".1f"), cell(r.get("projected_latency_ms"), ".1f"),
              cell(r["batched_tokens_per_s"], ".0f")] for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines, strict=True)]
    metric = rows[0]["metric"] if rows else ""
    text = [f"quality: {metric}; latency: median ms per example at batch size 1; projected: the cost model's "
            "latency (a projection); tok/s: batched throughput"]
    for line in [header, *lines]:
        text.append("  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w) for i, (x, w) in enumerate(zip(line, widths, strict=True))))
    return "\n".join(text)
