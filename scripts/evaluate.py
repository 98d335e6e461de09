"""`tw eval`: output quality, teacher use, wasted tokens and latency of every decoding method.

This script parses the config, runs every method and writes the results. The methods are classes
in :mod:`agents.methods` (one each, in its registry :data:`~agents.methods.METHODS`), and every
setting is measured by :func:`agents.evaluation.evaluate_setting`. The methods (the paper's §3.1 and
Figures 1–2, plus two reference points):

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
  only when no GKD draft is given. With ``speculative_targets``, both get one more row per draft length
  and target teacher fraction at a lenience calibrated to it on the calibration rows
  (``distillspec_calibration``, ``speculative_calibration``): the matched comparison at each fraction.
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
- ``co_llm``: Co-LLM's learnt per-token deferral (Shen et al., ACL 2024) with a router trained by
  ``tw co-llm`` (``co_llm_router``): the teacher writes token t where P(Z_t = 1) > η, one row per η of
  ``co_llm_thresholds`` and, with ``co_llm_targets``, one per target teacher fraction at an η calibrated
  to it on the calibration rows (``co_llm_calibration``); the router's plain prompt.
- ``bild``: Big Little Decoder (Kim et al., NeurIPS 2023), fallback with rollback, one row per α_FB ×
  α_RB (``bild_fallback`` × ``bild_rollback``; at most ``bild_small_iters`` small tokens between large
  passes), the fallback's small model; with ``bild_targets``, one row per target fraction at the α_FB
  calibrated to it for the α_RB with the best calibration-row quality there (``bild_calibration``).
  Rolled-back tokens are its ``wasted_per_example``.

What is measured for each method and setting:

- ``quality``: the task's metric (BLEU or ROUGE-2) over ``examples`` examples, decoded in batches.
- ``teacher_fraction``: Σ teacher tokens / Σ output tokens (token level, over the whole set).
- ``wasted_per_example``: rejected draft tokens per example (speculative decoding), rolled-back tokens (BiLD).
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
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import tw_env  # noqa: F401  (registers the tasks)
from agents.evaluation import (
    ForwardCosts,
    costs_measured_here,
    describe_device,
    evaluate_setting,
    evaluate_settings,
    given_forward_costs,
    with_projected_latency,
)
from agents.methods import METHODS, RAW_RULE, EvalContext, build_settings, make_eval_task
from agents.run import check_calibration_data, end_report, start_run
from tw_env.atomic import write_json
from tw_env.prompts import BUDGETS, PLAIN_TEMPLATE, check_budgets_for_style, check_template
from tw_env.registration import budget_style_of

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
    "student_forwards_per_example", "budget_cap", "calibrated_for", "projected_latency_ms", "rollback_threshold",
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
    methods: list | None = None  # among student, teacher, training_wheels, distillspec, speculative, fallback, co_llm, bild, kl_oracle (None: all available but kl_oracle)
    tw_policy: str | None = None  # a trained Training Wheels policy directory (e.g. runs/tw/best)
    budgets: list = field(default_factory=lambda: list(BUDGETS))  # Training Wheels budgets (Table 1 keywords; any b in [0, 1] with env_kwargs budget_style "numeric" or "numeric-fixed")
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
    speculative_targets: list = field(default_factory=list)  # teacher fractions DistillSpec's (and speculative's) lenience is calibrated to, per draft length (one row each)
    co_llm_router: str | None = None  # Co-LLM's router directory (tw co-llm's OUTPUT_DIR/best); runs co_llm by default when given
    co_llm_thresholds: list = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])  # Co-LLM deferral thresholds η (teacher writes where P(Z=1) > η)
    co_llm_targets: list = field(default_factory=list)  # teacher fractions Co-LLM's η is calibrated to (one row each)
    bild_fallback: list = field(default_factory=lambda: [0.3, 0.6, 0.9])  # BiLD fallback thresholds α_FB (official default 0.6)
    bild_rollback: list = field(default_factory=lambda: [2.0, 5.0])  # BiLD rollback thresholds α_RB in nats (official default 5; its README sweeps 2-5)
    bild_small_iters: int = 10  # BiLD: the most small-model tokens in a row before a large pass (official num_small_iters)
    bild_targets: list = field(default_factory=list)  # teacher fractions BiLD's α_FB is calibrated to, for each α_RB (one row each)
    calibration_split: str = "validation"  # split whose examples the thresholds are calibrated on (never data the evaluated split reads)
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
            for method in self.methods:
                METHODS[method].check(self)
        # A Table 1 keyword per budget, or (budget_style "numeric" in env_kwargs) any number in [0, 1] to 0.001.
        check_budgets_for_style(self.budgets, budget_style_of(self.env_id, self.env_kwargs))
        if any(not 0.0 <= float(x) <= 1.0 for x in self.lenience):
            raise ValueError(f"lenience values must lie in [0, 1], got {self.lenience}")
        if any(int(k) < 1 for k in self.draft_lengths):
            raise ValueError(f"draft lengths must be >= 1, got {self.draft_lengths}")
        if any(float(t) < 0 for t in self.thresholds):
            raise ValueError(f"thresholds must be >= 0, got {self.thresholds}")
        check_template(self.plain_prompt, "plain_prompt")
        for name in ("fallback_targets", "speculative_targets", "co_llm_targets", "bild_targets", "co_llm_thresholds"):
            if any(not 0.0 <= float(b) <= 1.0 for b in getattr(self, name)):
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if any(not float(x) >= 0 for x in [*self.bild_fallback, *self.bild_rollback]) or self.bild_small_iters < 1:
            raise ValueError(f"bild_fallback and bild_rollback must be >= 0 and bild_small_iters >= 1, got "
                             f"{self.bild_fallback}, {self.bild_rollback} and {self.bild_small_iters}")
        if self.tw_policy_candidates and not self.tw_calibrate:
            raise ValueError("tw_policy_candidates are chosen among by calibrated quality: set tw_calibrate too")
        if self.tw_calibrate and not self.tw_policy:
            raise ValueError("tw_calibrate calibrates a Training Wheels policy: pass --tw-policy DIR as well")
        if (self.fallback_targets or self.speculative_targets or self.co_llm_targets or self.bild_targets or self.tw_calibrate
                or "kl_oracle" in (self.methods or [])):
            check_calibration_data(self.env_kwargs, self.split, self.calibration_split)  # the files, not the names
        if self.calibration_examples < 1 or self.calibration_tolerance < 0 or self.calibration_delta < 0:
            raise ValueError("calibration_examples must be >= 1, calibration_tolerance and calibration_delta >= 0")
        given_forward_costs(self.teacher_forward_ms, self.student_forward_ms, self.cost_label)  # raises if half given

    def selected_methods(self) -> list[str]:
        if self.methods is not None:
            return list(self.methods)
        return [name for name, method in METHODS.items() if method.by_default(self)]


# ---------------------------------------------------------------------------------------------- run
def run(config: EvalConfig) -> dict:
    """Evaluate every selected method × setting; write results.json/.csv and outputs.jsonl; return the results."""
    run_ = start_run(config, config.output_dir)
    device = run_.device
    task = make_eval_task(config, device)
    examples = task.examples[: config.examples]
    context = EvalContext(config, task, device)
    settings = build_settings(context)
    device_name = describe_device(device)
    out = Path(config.output_dir)
    rows = []
    with open(out / "outputs.jsonl", "w") as outputs_file:
        def evaluate_one(setting):
            return evaluate_setting(
                setting, task, examples, plain_prompt=config.plain_prompt, batch_size=config.batch_size,
                latency_examples=config.latency_examples, warmup=config.warmup, device=device, device_name=device_name)

        for row, records in evaluate_settings(tqdm(settings, desc="methods x settings"), evaluate_one):
            rows.append(row)
            outputs_file.writelines(json.dumps(r) + "\n" for r in records)
    costs = add_projection(rows, config)
    reports = context.reports
    results = {
        "config": dataclasses.asdict(config), "env_id": config.env_id, "split": config.split,
        "metric": task.metric, "examples": len(examples), "max_new_tokens": task.max_new_tokens,
        "device": device_name, "torch": torch.__version__, "rows": [_json_safe(r) for r in rows],
        "cost_model": dataclasses.asdict(costs) if costs else None,
        "fallback_calibration": [dataclasses.asdict(c) for c in reports.get("fallback_calibration", [])],
        "kl_oracle_calibration": reports.get("kl_oracle_calibration"),
        "tw_calibration": reports.get("tw_calibration"),
        "distillspec_calibration": reports.get("distillspec_calibration"),
        "speculative_calibration": reports.get("speculative_calibration"),
        "co_llm_calibration": reports.get("co_llm_calibration"), "bild_calibration": reports.get("bild_calibration"),
    }
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", rows)
    print(end_of_evaluation(rows, out, f"{len(examples)} {config.split} examples", task.metric))
    return results


def add_projection(rows: list[dict], config: EvalConfig) -> ForwardCosts | None:
    """Each row's ``projected_latency_ms`` under the given per-forward costs, else those measured
    here; returns the :class:`~agents.evaluation.ForwardCosts` used (None: no costs to project with)."""
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


def end_of_evaluation(rows: list[dict], out: Path, evaluated: str, metric: str) -> str:
    """What `tw eval` prints as it ends: per budget, each budgeted method's teacher fraction / quality (a
    column per method, calibrated rows apart); a method without budgets in a line (one row) or counted
    (several: every row is in results.csv, and `tw plot` prints them all); where the files are."""
    unbudgeted: dict[str, list[dict]] = {}
    for row in rows:
        if _budget_of(row) is None:
            unbudgeted.setdefault(row["method"], []).append(row)
    alone = [f"{method} {r[0]['setting']}: {_fraction_quality(r[0])}" for method, r in unbudgeted.items() if len(r) == 1]
    several = [f"{len(r)} {method}" for method, r in unbudgeted.items() if len(r) > 1]
    notes = (["; ".join(alone)] if alone else []) + (
        [f"and {', '.join(several)} settings: every row is in results.csv"] if several else [])
    files = {"output": out, "results": out / "results.json", "table": out / "results.csv",
             "outputs": out / "outputs.jsonl"}
    return end_report(f"tw eval: {evaluated}; per budget b, teacher fraction / quality ({metric}):",
                      budget_table(rows), files, notes)


def budget_table(rows: list[dict]) -> list[list[str]]:
    """A header and one line per budget: each budgeted method's (calibrated rows: their target's) teacher
    fraction / quality, one column per method, calibration and budget cap."""
    columns: dict[str, dict[float, dict]] = {}
    for row in rows:
        budget, cap = _budget_of(row), row.get("budget_cap")
        if budget is not None:
            # The raw rule's rows (decoded beside the checkpoint's rule) get their own column, so that the
            # checkpoint's, the default a user gets, is the one under the method's name.
            name = (row["method"] + (" calibrated" if row.get("calibrated_for") is not None else "")
                    + (f" {RAW_RULE}" if str(row.get("setting", "")).endswith(RAW_RULE) else "")
                    + (f" ({cap} cap)" if cap not in (None, "off") else ""))
            columns.setdefault(name, {})[round(float(budget), 6)] = row
    budgets = sorted({b for column in columns.values() for b in column})
    body = [[f"{b:g}", *(_fraction_quality(column.get(b)) for column in columns.values())] for b in budgets]
    return [["b", *columns], *body] if columns else []


def _budget_of(row: dict) -> float | None:
    """The budget a row stands for: the target it was calibrated to, else its budget (None: neither)."""
    return row["calibrated_for"] if row.get("calibrated_for") is not None else row.get("budget")


def _fraction_quality(row: dict | None) -> str:
    if row is None:
        return "-"
    quality = row["quality"]
    return f"{row['teacher_fraction']:.3f} / " + (f"{quality:.2f}" if quality is not None and _finite(quality) else "-")
