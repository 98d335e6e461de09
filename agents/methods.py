"""The decoding methods `tw eval` compares, each one class behind one small interface, and the
registry (:data:`METHODS`) the command reads.

A method (:class:`EvalMethod`) says

- which decoding settings it contributes (:meth:`~EvalMethod.settings`: one per budget, per
  threshold, per draft length × lenience, ...), each a :class:`~agents.evaluation.Setting` that
  carries how a batch is decoded with it (the method's ``decoder``);
- optionally, settings whose threshold it calibrates on held-out rows (:meth:`~EvalMethod.calibrate`,
  on the shared :class:`CalibrationRows`), with what it tried reported into results.json;
- what it needs from the config (:meth:`~EvalMethod.check`) and whether it runs when the config
  lists no ``methods`` (:meth:`~EvalMethod.by_default`).

Adding a method is writing one such class and decorating it with :func:`register`. Every setting is
then measured by the same loop (:func:`agents.evaluation.evaluate_setting` on top of
:func:`agents.evaluation.decode_batches`), which the calibrations run too.
"""

from __future__ import annotations

import glob
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from agents.decoding import confidence_fallback_decode, generate_alone, speculative_decode
from agents.evaluation import (
    BudgetResult,
    Calibration,
    Decode,
    Prompts,
    Setting,
    ThresholdDecodes,
    calibrate_call_threshold,
    calibrate_kl_threshold,
    calibrate_threshold,
    in_batches,
    is_better_selection,
    prompt_encoder,
    seeded_subset,
    selection_record,
    training_wheels_decoder,
)
from agents.policy import StudentPolicy
from agents.routers import CoLLMRouter, bild_decode, co_llm_decode
from tw_env.models import load_model
from tw_env.registration import make_task, split_env_options
from tw_env.task import FromTask, Task


class EvalOptions(Protocol):
    """What the methods read of `tw eval`'s config (:class:`scripts.evaluate.EvalConfig`)."""

    env_id: str
    env_kwargs: dict[str, Any]
    split: str
    max_new_tokens: int | None
    methods: list[str] | None
    plain_prompt: str
    batch_size: int
    student: str | None
    tw_policy: str | None
    budgets: list[float]
    budget_cap: str
    tw_calibrate: bool
    tw_policy_candidates: list[str]
    calibration_delta: float
    draft: str | None
    draft_lengths: list[int]
    lenience: list[float]
    fallback_student: str | None
    thresholds: list[float]
    fallback_targets: list[float]
    speculative_targets: list[float]
    co_llm_router: str | None
    co_llm_thresholds: list[float]
    co_llm_targets: list[float]
    bild_fallback: list[float]
    bild_rollback: list[float]
    bild_small_iters: int
    bild_targets: list[float]
    calibration_split: str
    calibration_examples: int
    calibration_seed: int
    calibration_tolerance: float

    def selected_methods(self) -> list[str]: ...


def make_eval_task(options: EvalOptions, device: torch.device, split: str | None = None,
                   teacher: PreTrainedModel | None = None) -> Task:
    """The task of ``options.env_id`` on the evaluated split, or on ``split`` (env options in ``env_kwargs``
    are ignored); ``teacher``: an already loaded teacher to reuse instead of loading it again."""
    _, task_kwargs = split_env_options(dict(options.env_kwargs))
    task_kwargs.setdefault("device", str(device))
    if teacher is not None:
        task_kwargs["teacher"] = teacher
    if options.max_new_tokens is not None:
        task_kwargs["max_new_tokens"] = options.max_new_tokens
    return make_task(options.env_id, **{**task_kwargs, "split": split or options.split})


# ---------------------------------------------------------------------------------------------- calibration rows
class CalibrationRows:
    """The calibration examples (``calibration_examples`` of ``calibration_split``, seeded; the
    evaluated task's teacher, not a second copy) and the threshold searches on them."""

    def __init__(self, options: EvalOptions, device: torch.device, teacher: PreTrainedModel) -> None:
        self.options, self.device = options, device
        self.task = make_eval_task(options, device, split=options.calibration_split, teacher=teacher)
        examples = seeded_subset(self.task.examples, min(options.calibration_examples, len(self.task.examples)),
                                 options.calibration_seed)
        self.sources, self.references = [e.source for e in examples], [e.reference for e in examples]

    def prompts(self, budget: float | None) -> list[Prompts]:
        """The calibration sources in batches of ``batch_size``, encoded at ``budget`` (None: the plain prompt)."""
        encode = prompt_encoder(self.task, budget, self.options.plain_prompt, self.device)
        return list(in_batches(encode, self.sources, self.options.batch_size))

    def measure(self, decodes: ThresholdDecodes, measured: dict[float, tuple[float, float]], threshold: float) -> float:
        """Teacher fraction at ``threshold`` of the decoder behind ``decodes`` (which reuses a batch whose
        call decisions would repeat); (fraction, quality) cached in ``measured`` by threshold, so that a
        threshold is decoded once."""
        if threshold not in measured:
            decoded = decodes.decode(threshold)
            measured[threshold] = (decoded.teacher_fraction, decoded.quality(self.task.metric, self.references))
        return measured[threshold][0]

    def decodes(self, decoder: Callable[[float], Decode], budget: float | None) -> ThresholdDecodes:
        """The calibration rows' prompts at ``budget`` (None: the plain prompt), decoded by ``decoder(threshold)``."""
        return ThresholdDecodes(decoder, self.prompts(budget), self.task.tokenizer)

    def per_budget(self, decoder: Callable[[float, float], Decode], calibrate: Callable[..., Calibration],
                   desc: str) -> tuple[list[Calibration], list[dict[str, Any]]]:
        """For each budget b of the config, ``calibrate(fraction_at, b, tolerance=…)`` with
        ``decoder(b, threshold)`` decoding the budget-b prompts. Returns the Calibrations and, per
        budget, {budget, threshold, teacher_fraction, quality, tried: [[threshold, fraction, quality], …]}."""
        options = self.options
        found_list, entries = [], []
        for b in tqdm([float(b) for b in options.budgets], desc=f"{desc} on {options.calibration_split}"):
            decodes = self.decodes(partial(decoder, b), b)
            measured: dict[float, tuple[float, float]] = {}  # threshold -> (teacher fraction, quality)

            def teacher_fraction_at(threshold: float, decodes: ThresholdDecodes = decodes,
                                    measured: dict[float, tuple[float, float]] = measured) -> float:
                return self.measure(decodes, measured, threshold)

            found = calibrate(teacher_fraction_at, b, tolerance=options.calibration_tolerance)
            found_list.append(found)
            entries.append({
                "budget": b, "threshold": found.threshold, "teacher_fraction": found.teacher_fraction,
                "quality": measured[found.threshold][1],
                "tried": [[c, f, measured[c][1]] for c, f in found.tried]})
        return found_list, entries


def calibrated_per_target(rows: CalibrationRows, decoder: Callable[[float], Decode], targets: Sequence[float],
                          calibrate: Callable[..., Calibration], desc: str) -> tuple[list[Calibration], dict[float, tuple[float, float]]]:
    """One threshold per target teacher fraction, calibrated on the calibration rows' plain prompts; a
    threshold is decoded once for all targets. Returns the Calibrations and (fraction, quality) per threshold."""
    decodes = rows.decodes(decoder, None)
    measured: dict[float, tuple[float, float]] = {}

    def teacher_fraction_at(threshold: float) -> float:
        return rows.measure(decodes, measured, threshold)

    found = [calibrate(teacher_fraction_at, float(t), tolerance=rows.options.calibration_tolerance)
             for t in tqdm(targets, desc=f"{desc} on {rows.options.calibration_split}")]
    return found, measured


def calibration_report(found: Calibration, measured: dict[float, tuple[float, float]], **extra: Any) -> dict[str, Any]:
    """A calibration as results.json reports it: target, threshold, fraction, quality and every threshold tried."""
    return {"target": found.target, "threshold": found.threshold, "teacher_fraction": found.teacher_fraction,
            "quality": measured[found.threshold][1], **extra,
            "tried": [[c, f, measured[c][1]] for c, f in found.tried]}


# ---------------------------------------------------------------------------------------------- the interface
class EvalContext:
    """What the methods of one `tw eval` run share: the options, the evaluated task (its teacher and
    output length), the device, every model loaded once, the calibration rows (made on first use),
    the methods built so far and what they report for results.json (``reports``)."""

    def __init__(self, options: EvalOptions, task: Task, device: torch.device) -> None:
        self.options, self.task, self.device = options, task, device
        self.dtype = options.env_kwargs.get("dtype")
        self.methods: dict[str, EvalMethod] = {}
        self.reports: dict[str, Any] = {}  # fallback_calibration, kl_oracle_calibration, tw_calibration
        self._models: dict[str, PreTrainedModel] = {}
        self._calibration: CalibrationRows | None = None

    teacher = FromTask[PreTrainedModel]()
    max_new_tokens = FromTask[int]()

    @property
    def student_source(self) -> str | PreTrainedModel | None:
        """The plain student: the config's, else the task's."""
        return self.options.student or self.task.student

    def model(self, source: str | PreTrainedModel | None, role: str) -> PreTrainedModel:
        """The model at ``source`` (loaded once however many methods use it)."""
        if isinstance(source, PreTrainedModel):
            return source
        if source is None:
            raise ValueError(f"no {role} model: pass --{role.replace('_', '-')} (a directory or hub id)")
        key = str(source)
        if key not in self._models:
            self._models[key] = load_model(key, role=role, device=self.device, dtype=self.dtype)
        return self._models[key]

    def policy(self, source: str | Path) -> StudentPolicy:
        return StudentPolicy.load(source, device=self.device, dtype=self.dtype).eval()

    @property
    def small_model_source(self) -> str | PreTrainedModel | None:
        """The small model of the fallback and BiLD: ``fallback_student``, else the GKD draft (aligned with
        the teacher, as BiLD aligns its small model), else the plain student."""
        return self.options.fallback_student or self.options.draft or self.student_source

    def calibration(self) -> CalibrationRows:
        """The calibration rows, shared by every calibration (made on first use)."""
        if self._calibration is None:
            self._calibration = CalibrationRows(self.options, self.device, self.teacher)
        return self._calibration


class EvalMethod(ABC):
    """One decoding method of `tw eval`. Built (its models loaded) when its turn comes; its settings,
    then its calibrated settings, are the rows of the results in that order."""

    name: ClassVar[str]
    follows: ClassVar[str | None] = None  # built right after this method, whose state it reads
    needs: ClassVar[tuple[str, str] | None] = None  # (the option it cannot run without, what to pass for it)

    def __init__(self, context: EvalContext) -> None:
        self.context = context
        self.options = context.options

    @classmethod
    def by_default(cls, options: EvalOptions) -> bool:
        """Whether `tw eval` runs it when the config lists no ``methods``: when the option it ``needs`` is given."""
        return cls.needs is not None and bool(getattr(options, cls.needs[0]))

    @classmethod
    def check(cls, options: EvalOptions) -> None:
        """Raise ValueError when the config lists this method but cannot run it (without the option it ``needs``)."""
        if cls.needs is not None and not getattr(options, cls.needs[0]):
            raise ValueError(f"method {cls.name!r} needs {cls.needs[1]}")

    @abstractmethod
    def settings(self) -> list[Setting]:
        """The settings from the config, each with its decoder."""

    def calibrate(self) -> list[Setting]:
        """Settings whose threshold is calibrated on the calibration rows (none by default)."""
        return []


M = TypeVar("M", bound=type[EvalMethod])
METHODS: dict[str, type[EvalMethod]] = {}  # name -> method, in the order `tw eval` lists them


def register(method: M) -> M:
    """Add a method to :data:`METHODS` under its ``name`` (a class decorator)."""
    if method.name in METHODS:
        raise ValueError(f"an evaluation method named {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


def build_settings(context: EvalContext) -> list[Setting]:
    """Build every selected method in turn (each model loaded once) and list its settings, then its
    calibrated ones: the rows of the results, in the order of ``methods`` (a method that follows
    another right after it)."""
    settings: list[Setting] = []
    for name in build_order(context.options.selected_methods()):
        method = METHODS[name](context)
        context.methods[name] = method
        settings += method.settings()
        settings += method.calibrate()
    return settings


def build_order(names: Sequence[str]) -> list[str]:
    """``names`` with each method that follows another moved right after it."""
    order: list[str] = []
    for name in names:
        if METHODS[name].follows is None:
            order.append(name)
            order += [other for other in dict.fromkeys(names) if METHODS[other].follows == name]
    return order


# ---------------------------------------------------------------------------------------------- the methods
class _Alone(EvalMethod):
    """One model alone (greedy ``generate``), one setting; plain prompt."""

    is_teacher: ClassVar[bool]

    @classmethod
    def by_default(cls, options: EvalOptions) -> bool:
        return True

    def __init__(self, context: EvalContext) -> None:
        super().__init__(context)
        self.model = context.teacher if self.is_teacher else context.model(context.student_source, "student")

    def decoder(self) -> Decode:
        model, max_new, is_teacher = self.model, self.context.max_new_tokens, self.is_teacher
        return lambda i, m: generate_alone(model, i, m, max_new, is_teacher=is_teacher)

    def settings(self) -> list[Setting]:
        return [Setting(self.name, "alone", self.decoder())]


@register
class StudentAlone(_Alone):
    """``student``: the plain student alone."""

    name, is_teacher = "student", False


@register
class TeacherAlone(_Alone):
    """``teacher``: the teacher alone."""

    name, is_teacher = "teacher", True


RAW_RULE = "raw π>½"  # the label suffix of tw eval's rows that decode with the raw rule beside the checkpoint's


@register
class TrainingWheels(EvalMethod):
    """``training_wheels``: a trained policy that calls the teacher with <τ>, one setting per budget
    (optionally under a hard cap); with ``tw_calibrate``, one more per budget at a call threshold
    calibrated to b, using the candidate policy that ``tw train``'s selection rule prefers there."""

    name = "training_wheels"
    needs = ("tw_policy", "--tw-policy DIR (a trained policy, e.g. runs/tw/best)")

    def __init__(self, context: EvalContext) -> None:
        super().__init__(context)
        assert self.options.tw_policy is not None  # check() refuses a config without it
        self.policy = context.policy(self.options.tw_policy)
        self.chosen = self.policy  # the calibrated settings' policy (the KL oracle's too)
        self.capped = self.options.budget_cap != "off"
        self.rule = self.options.budget_cap if self.capped else "rounded_up"  # the rule is unused without a cap
        self.suffix = " guaranteed cap" if self.options.budget_cap == "guaranteed" else ""

    def decoder(self, budget: float, threshold: float | None, policy: StudentPolicy) -> Decode:
        return training_wheels_decoder(policy, self.context.teacher, self.context.max_new_tokens,
                                       budget_cap=budget if self.capped else None, cap_rule=self.rule,
                                       call_threshold=threshold, budget=budget)

    def settings(self) -> list[Setting]:
        """Per budget, the checkpoint's own rule (the threshold ``tw train`` calibrated and saved with the
        policy, else ½); where that is not ½, the raw rule π(<τ>) > ½ beside it, labelled."""
        rows = []
        for b in (float(b) for b in self.options.budgets):
            shipped = self.policy.call_threshold_for(b)
            label = f"b={b:g}{self.suffix}" + (f" (checkpoint c={shipped:.3g})" if shipped != 0.5 else "")
            rows.append(Setting(self.name, label, self.decoder(b, None, self.policy), budget=b, threshold=shipped,
                                budget_cap=self.options.budget_cap))
            if shipped != 0.5:
                rows.append(Setting(self.name, f"b={b:g}{self.suffix} {RAW_RULE}", self.decoder(b, 0.5, self.policy),
                                    budget=b, threshold=0.5, budget_cap=self.options.budget_cap))
        return rows

    def calibrate(self) -> list[Setting]:
        if not self.options.tw_calibrate:
            return []
        candidates = {str(self.options.tw_policy): self.policy}
        for source in expand_candidates(self.options.tw_policy_candidates):
            loaded = self.context.policy(source)
            candidates.setdefault(str(source), loaded)
        report, found_list = self.choose(candidates, self.context.calibration())
        self.context.reports["tw_calibration"] = report
        self.chosen = candidates[report["chosen"]]
        return [Setting(self.name, f"b={found.target:g}{self.suffix} calibrated c={found.threshold:.3g}",
                        self.decoder(found.target, found.threshold, self.chosen), budget=found.target,
                        threshold=found.threshold, budget_cap=self.options.budget_cap, calibrated_for=found.target)
                for found in found_list]

    def choose(self, candidates: dict[str, StudentPolicy], rows: CalibrationRows) -> tuple[dict[str, Any], list[Calibration]]:
        """Each candidate policy's call threshold per budget, calibrated on the calibration rows
        (:func:`~agents.evaluation.calibrate_call_threshold`), and the candidate that ``tw train``'s
        selection rule (:func:`~agents.evaluation.is_better_selection`, budgets as targets within
        ``calibration_delta``) prefers at its calibrated thresholds there: a policy whose calibration
        cannot reach some budget loses to one that can, whatever its quality. The evaluated split is
        never read. A candidate with the same weights as an earlier one (:func:`weights_digest`)
        reuses its calibration instead of decoding again, and says so (``same_weights_as``).

        Returns the report {"split", "examples", "candidates": [{"policy", "meets_budgets",
        "worst_violation", "mean_quality", "budgets": [{budget, threshold, teacher_fraction, quality,
        tried: [[c, fraction, quality], ...]}]}], "chosen": source} and the chosen one's Calibrations.
        """
        report: dict[str, Any] = {"split": self.options.calibration_split, "examples": len(rows.references),
                                  "candidates": []}
        found_by_source: dict[str, list[Calibration]] = {}
        first_with_weights: dict[str, str] = {}  # weights digest -> the first candidate that has them
        for source, policy in candidates.items():
            same = first_with_weights.setdefault(weights_digest(source), source)
            extra: dict[str, str] = {}
            if same != source:  # e.g. tw train's best/ is also one of its phase2-evaluated/step-N: decoding is deterministic
                found_by_source[source] = found_by_source[same]
                entries = next(c["budgets"] for c in report["candidates"] if c["policy"] == same)
                extra = {"same_weights_as": same}
            else:
                found_by_source[source], entries = rows.per_budget(
                    partial(self.decoder, policy=policy), calibrate_call_threshold, f"calibrating {source}")
            record = selection_record([BudgetResult(e["budget"], e["teacher_fraction"], e["quality"], len(rows.references))
                                       for e in entries], self.options.calibration_delta, ceiling=False)
            report["candidates"].append({"policy": source, **{k: record[k] for k in ("meets_budgets", "worst_violation",
                                                                                     "mean_quality")},
                                         "budgets": entries, **extra})
        best = report["candidates"][0]  # tw_policy: it wins ties
        for entry in report["candidates"][1:]:
            best = entry if is_better_selection(entry, best) else best
        report["chosen"] = best["policy"]
        return report, found_by_source[best["policy"]]


class _LossySpeculative(EvalMethod):
    """Lossy greedy speculative decoding (Appendix 5.3, Algorithm 1), one setting per draft length K
    × lenience l; plain prompt."""

    role: ClassVar[str]  # the draft model's role, in messages

    def __init__(self, context: EvalContext) -> None:
        super().__init__(context)
        self.draft = context.model(self.draft_source(), self.role)

    @abstractmethod
    def draft_source(self) -> str | PreTrainedModel | None: ...

    def decoder(self, draft_length: int, lenience: float) -> Decode:
        draft, teacher, max_new = self.draft, self.context.teacher, self.context.max_new_tokens
        return lambda i, m: speculative_decode(draft, teacher, i, m, max_new, lenience=lenience, draft_length=draft_length)

    def settings(self) -> list[Setting]:
        return [Setting(self.name, f"K={int(k)} l={float(lenience):g}", self.decoder(int(k), float(lenience)),
                        lenience=float(lenience), draft_length=int(k), decodes_like=(self.name, int(k), float(lenience)))
                for k in self.options.draft_lengths for lenience in self.options.lenience]

    def calibrate(self) -> list[Setting]:
        """With ``speculative_targets``: per draft length, one lenience per target teacher fraction (replacement
        and bonus tokens are the teacher's), bisected in log10(l) on the calibration rows (the fraction grows
        with l; l = 0 accepts every draft); every lenience tried is reported."""
        self.context.reports[f"{self.name}_calibration"] = []
        if not self.options.speculative_targets:
            return []
        settings, report = [], []
        for k in (int(k) for k in self.options.draft_lengths):
            found_list, measured = calibrated_per_target(
                self.context.calibration(), partial(self.decoder, k), self.options.speculative_targets,
                calibrate_threshold, f"calibrating {self.name}'s lenience at K={k}")
            report += [calibration_report(f, measured, draft_length=k) for f in found_list]
            settings += [Setting(self.name, f"K={k} l={found.threshold:.3g} (for {found.target:g})",
                                 self.decoder(k, found.threshold), lenience=found.threshold, draft_length=k,
                                 calibrated_for=found.target, decodes_like=(self.name, k, found.threshold))
                         for found in found_list]
        self.context.reports[f"{self.name}_calibration"] = report
        return settings


@register
class DistillSpec(_LossySpeculative):
    """``distillspec``: the speculative decoder with the GKD draft model (``tw gkd``)."""

    name, role = "distillspec", "draft"
    needs = ("draft", "--draft DIR (the GKD draft model, e.g. runs/gkd/best)")

    def draft_source(self) -> str | PreTrainedModel | None:
        return self.options.draft


@register
class Speculative(_LossySpeculative):
    """``speculative``: the same decoder with the plain student as the draft (no GKD)."""

    name, role = "speculative", "student"

    @classmethod
    def by_default(cls, options: EvalOptions) -> bool:
        return not options.draft

    def draft_source(self) -> str | PreTrainedModel | None:
        return self.context.student_source


@register
class ConfidenceFallback(EvalMethod):
    """``fallback``: Big Little Decoder's confidence fallback, one setting per threshold; with
    ``fallback_targets``, one more per target teacher fraction at a threshold calibrated to it."""

    name = "fallback"

    @classmethod
    def by_default(cls, options: EvalOptions) -> bool:
        return True

    def __init__(self, context: EvalContext) -> None:
        super().__init__(context)
        self.model = context.model(context.small_model_source, "fallback_student")

    def decoder(self, threshold: float) -> Decode:
        model, teacher, max_new = self.model, self.context.teacher, self.context.max_new_tokens
        return lambda i, m: confidence_fallback_decode(model, teacher, i, m, max_new, threshold=threshold)

    def settings(self) -> list[Setting]:
        return [Setting(self.name, f"t={float(t):g}", self.decoder(float(t)), threshold=float(t),
                        decodes_like=(self.name, float(t))) for t in self.options.thresholds]

    def calibrate(self) -> list[Setting]:
        """One threshold per ``fallback_targets`` (:func:`~agents.evaluation.calibrate_threshold`), on
        the calibration rows' plain prompts; every threshold tried is reported."""
        found_list: list[Calibration] = []
        self.context.reports["fallback_calibration"] = found_list
        if not self.options.fallback_targets:
            return []
        found_list += calibrated_per_target(self.context.calibration(), self.decoder, self.options.fallback_targets,
                                            calibrate_threshold, "calibrating the fallback")[0]
        return [Setting(self.name, f"t={found.threshold:.3g} (for {found.target:g})", self.decoder(found.threshold),
                        threshold=found.threshold, calibrated_for=found.target, decodes_like=(self.name, found.threshold))
                for found in found_list]


@register
class CoLLM(EvalMethod):
    """``co_llm``: Co-LLM's learnt deferral (a router trained by ``tw co-llm``), one setting per threshold η
    (the teacher writes where P(Z_t = 1) > η); with ``co_llm_targets``, one more per target teacher
    fraction at an η calibrated to it on the calibration rows (bisection in log-odds, as Co-LLM picks η per
    fraction from the deferral probabilities on validation data). Plain prompt: the router's own."""

    name = "co_llm"
    needs = ("co_llm_router", "--co-llm-router DIR (a router trained by tw co-llm, e.g. runs/co-llm/best)")

    def __init__(self, context: EvalContext) -> None:
        super().__init__(context)
        assert self.options.co_llm_router is not None  # check() refuses a config without it
        self.router = CoLLMRouter.load(self.options.co_llm_router, device=context.device, dtype=context.dtype)
        prompt = self.router.prompt
        if prompt is not None and prompt != self.options.plain_prompt:
            raise ValueError(f"the Co-LLM router at {self.options.co_llm_router} was trained on the prompt {prompt!r}, "
                             f"but plain_prompt is {self.options.plain_prompt!r}; expected the same template")

    def decoder(self, threshold: float) -> Decode:
        router, teacher, max_new = self.router, self.context.teacher, self.context.max_new_tokens
        return lambda i, m: co_llm_decode(router, teacher, i, m, max_new, threshold=threshold)

    def settings(self) -> list[Setting]:
        return [Setting(self.name, f"η={float(t):g}", self.decoder(float(t)), threshold=float(t),
                        decodes_like=(self.name, float(t))) for t in self.options.co_llm_thresholds]

    def calibrate(self) -> list[Setting]:
        self.context.reports["co_llm_calibration"] = []
        if not self.options.co_llm_targets:
            return []
        found_list, measured = calibrated_per_target(self.context.calibration(), self.decoder, self.options.co_llm_targets,
                                                     calibrate_call_threshold, "calibrating Co-LLM's η")
        self.context.reports["co_llm_calibration"] = [calibration_report(f, measured) for f in found_list]
        return [Setting(self.name, f"η={found.threshold:.3g} (for {found.target:g})", self.decoder(found.threshold),
                        threshold=found.threshold, calibrated_for=found.target, decodes_like=(self.name, found.threshold))
                for found in found_list]


@register
class BiLD(EvalMethod):
    """``bild``: Big Little Decoder's fallback with rollback, one setting per α_FB × α_RB (``bild_fallback`` ×
    ``bild_rollback``, ``bild_small_iters`` small tokens at most between large passes); the small model is the
    fallback's. With ``bild_targets``, one more per target teacher fraction: for each α_RB, α_FB is calibrated
    to the target on the calibration rows, and the α_RB whose calibration lands within
    ``calibration_delta`` with the best quality there is kept (else the closest): the Pareto choice at that
    fraction. Plain prompt."""

    name = "bild"

    @classmethod
    def by_default(cls, options: EvalOptions) -> bool:
        return True

    def __init__(self, context: EvalContext) -> None:
        super().__init__(context)
        self.model = context.model(context.small_model_source, "fallback_student")

    def decoder(self, fallback: float, rollback: float) -> Decode:
        model, teacher, max_new, small_iters = self.model, self.context.teacher, self.context.max_new_tokens, self.options.bild_small_iters
        return lambda i, m: bild_decode(model, teacher, i, m, max_new, fallback, rollback, small_iters)

    def settings(self) -> list[Setting]:
        return [Setting(self.name, f"FB={float(fb):g} RB={float(rb):g}", self.decoder(float(fb), float(rb)),
                        threshold=float(fb), rollback_threshold=float(rb), decodes_like=(self.name, float(fb), float(rb)))
                for rb in self.options.bild_rollback for fb in self.options.bild_fallback]

    def calibrate(self) -> list[Setting]:
        self.context.reports["bild_calibration"] = []
        if not self.options.bild_targets:
            return []
        rows, targets = self.context.calibration(), [float(t) for t in self.options.bild_targets]
        per_rollback = {float(rb): calibrated_per_target(rows, partial(self.decoder, rollback=float(rb)), targets,
                                                         calibrate_threshold, f"calibrating BiLD's α_FB at α_RB={rb:g}")
                        for rb in self.options.bild_rollback}
        settings, report = [], []
        for i, target in enumerate(targets):
            candidates = [(rb, found_list[i], measured) for rb, (found_list, measured) in per_rollback.items()]
            within = [c for c in candidates if abs(c[1].teacher_fraction - target) <= self.options.calibration_delta]
            if within:  # the best quality among the calibrations that land at the target
                rb, found, measured = max(within, key=lambda c: c[2][c[1].threshold][1])
            else:
                rb, found, measured = min(candidates, key=lambda c: abs(c[1].teacher_fraction - target))
            report.append({"target": target, "chosen": {"rollback_threshold": rb, "fallback_threshold": found.threshold},
                           "candidates": [calibration_report(f, m, rollback_threshold=r) for r, f, m in candidates]})
            settings.append(Setting(self.name, f"FB={found.threshold:.3g} RB={rb:g} (for {target:g})",
                                    self.decoder(found.threshold, rb), threshold=found.threshold,
                                    rollback_threshold=rb, calibrated_for=target,
                                    decodes_like=(self.name, found.threshold, rb)))
        self.context.reports["bild_calibration"] = report
        return settings


@register
class KLOracle(EvalMethod):
    """``kl_oracle``: a reference for the call ranking, not a decoder one can deploy. The Training
    Wheels policy's tokens (the calibrated settings' policy with ``tw_calibrate``), the teacher writing
    wherever KL(p ‖ π_V) exceeds a threshold calibrated to each budget on the calibration rows
    (:func:`~agents.evaluation.calibrate_kl_threshold`); it runs the teacher at every token."""

    name = "kl_oracle"
    follows = "training_wheels"

    @classmethod
    def check(cls, options: EvalOptions) -> None:
        if "training_wheels" not in (options.methods or []):
            raise ValueError("method 'kl_oracle' reuses the Training Wheels policy: list 'training_wheels' too")

    def __init__(self, context: EvalContext) -> None:
        super().__init__(context)
        training_wheels = context.methods["training_wheels"]
        assert isinstance(training_wheels, TrainingWheels)
        self.policy = training_wheels.chosen

    def decoder(self, budget: float, threshold: float) -> Decode:
        """The policy's tokens at ``budget``'s prompts, the teacher's where KL exceeds ``threshold`` (no cap)."""
        return training_wheels_decoder(self.policy, self.context.teacher, self.context.max_new_tokens,
                                       kl_oracle_threshold=threshold)

    def settings(self) -> list[Setting]:
        return []  # every setting is calibrated

    def calibrate(self) -> list[Setting]:
        found_list, entries = self.context.calibration().per_budget(
            self.decoder, calibrate_kl_threshold, "calibrating the KL oracle")
        self.context.reports["kl_oracle_calibration"] = entries
        return [Setting(self.name, f"b={found.target:g} KL>{found.threshold:.3g}", self.decoder(found.target, found.threshold),
                        budget=found.target, threshold=found.threshold, calibrated_for=found.target)
                for found in found_list]


# ---------------------------------------------------------------------------------------------- candidates
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
