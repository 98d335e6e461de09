"""The registered tasks: one table, :data:`TASKS`, from which the Gymnasium registrations, the entry
points and :func:`make_task` (one factory from an id plus overrides) all follow.

Adding a task is one :class:`RegisteredTask` row in :data:`TASKS`: importing :mod:`tw_env` registers
every row (:func:`register_tasks`) with ``entry_point="tw_env.registration:make_{name}_env"`` and
``vector_entry_point="tw_env.registration:make_{name}_vector_env"``, two functions this module makes
for the row.

Every model and dataset is overridable by keyword, exactly as ``gym.make(id, **kwargs)`` takes them:
the task's keywords (teacher, student, tokenizer, data, split, ..., see :func:`make_task`) build the
:class:`~tw_env.task.Task`; the env's own keywords (``reward_clip``, ``teacher_sampling``, ...)
go to the env.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gymnasium.envs.registration import register, registry
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tw_env.env import ENV_OPTIONS, TeacherAssistedDecodingEnv
from tw_env.prompts import NO_TEACHER_USE_TEMPLATE, NUMERIC_NO_TEACHER_USE_TEMPLATE, PLAIN_TEMPLATE
from tw_env.task import Task
from tw_env.tasks import TaskSpec, load_examples
from tw_env.vector_env import TeacherAssistedDecodingVectorEnv

FLAN_T5_XL = "google/flan-t5-xl"
FLAN_T5_SMALL = "google/flan-t5-small"
# The teacher's prompt C^(T): the task without the student's budget clause, which is not meant for it.
HUB_TEACHER_PROMPT = PLAIN_TEMPLATE
SYNTHETIC_TEACHER_PROMPT = NO_TEACHER_USE_TEMPLATE

XSUM_ID = "TrainingWheels-XSum-v0"
WMT19_ID = "TrainingWheels-WMT19-v0"
SYNTHETIC_ID = "TrainingWheels-Synthetic-v0"
SYNTHETIC_CAUSAL_ID = "TrainingWheels-SyntheticCausal-v0"
SYNTHETIC_NUMERIC_ID = "TrainingWheels-SyntheticNumeric-v0"


@dataclass(frozen=True)
class RegisteredTask:
    """One registered id: its data (a hub :class:`~tw_env.tasks.TaskSpec` with FLAN-T5 models by default,
    or an embedded pair of :func:`tw_env.synthetic.embedded_pairs` whose models and data are made on
    first use), default lengths and the teacher's prompt."""

    env_id: str
    name: str  # the entry points are make_{name}_env and make_{name}_vector_env in this module
    max_new_tokens: int
    max_prompt_length: int
    teacher_prompt: str
    spec: TaskSpec | None = None  # a hub task's data, instruction and metric
    embedded: str | None = None  # an embedded task's pair (its name in tw_env.synthetic.embedded_pairs())

    def __post_init__(self) -> None:
        if (self.spec is None) == (self.embedded is None):
            raise ValueError(f"{self.env_id}: give a hub task's spec or an embedded pair's name, exactly one")

    @property
    def entry_point(self) -> str:
        return f"{__name__}:make_{self.name}_env"

    @property
    def vector_entry_point(self) -> str:
        return f"{__name__}:make_{self.name}_vector_env"

    def defaults(self) -> str:
        """What the id builds when nothing is overridden (for the entry points' docstrings)."""
        if self.spec is None:
            return (f"the embedded pair {self.embedded!r} (a teacher and student) and data, trained and "
                    "cached on first use (tw_env.synthetic)")
        return (f"teacher {FLAN_T5_XL}, student {FLAN_T5_SMALL} (its tokenizer too), data "
                f"{self.spec.default_data}; local directories/files override any of them")


TASKS: tuple[RegisteredTask, ...] = (
    RegisteredTask(XSUM_ID, "xsum", max_new_tokens=64, max_prompt_length=512, teacher_prompt=HUB_TEACHER_PROMPT,
                   spec=TaskSpec("xsum", "summarize", "rouge2", "document", "summary", "EdinburghNLP/xsum")),
    RegisteredTask(WMT19_ID, "wmt19", max_new_tokens=64, max_prompt_length=128, teacher_prompt=HUB_TEACHER_PROMPT,
                   spec=TaskSpec("wmt19", "translate German to English", "bleu", "de", "en", "wmt/wmt19", "de-en")),
    RegisteredTask(SYNTHETIC_ID, "synthetic", max_new_tokens=20, max_prompt_length=32,
                   teacher_prompt=SYNTHETIC_TEACHER_PROMPT, embedded="synthetic"),
    RegisteredTask(SYNTHETIC_CAUSAL_ID, "synthetic_causal", max_new_tokens=20, max_prompt_length=32,
                   teacher_prompt=SYNTHETIC_TEACHER_PROMPT, embedded="synthetic-causal"),
    # The embedded T5 task for any budget in [0, 1]: numeric budget prompts ("With teacher use 0.15, ...").
    RegisteredTask(SYNTHETIC_NUMERIC_ID, "synthetic_numeric", max_new_tokens=20, max_prompt_length=32,
                   teacher_prompt=NUMERIC_NO_TEACHER_USE_TEMPLATE, embedded="synthetic-numeric"),
)
REGISTERED: dict[str, RegisteredTask] = {task.env_id: task for task in TASKS}


def register_tasks() -> None:
    """Register every row of :data:`TASKS` with Gymnasium (an id registered already is left as it is)."""
    for task in TASKS:
        if task.env_id not in registry:
            register(id=task.env_id, entry_point=task.entry_point, vector_entry_point=task.vector_entry_point)


def registered_task(env_id: str) -> RegisteredTask:
    """The row of :data:`TASKS` for ``env_id``."""
    if env_id not in REGISTERED:
        raise ValueError(f"unknown task id {env_id!r}; expected one of {sorted(REGISTERED)}")
    return REGISTERED[env_id]


def budget_style_of(env_id: str, env_kwargs: dict[str, Any] | None = None) -> str:
    """How a task's prompts will state the budget: ``env_kwargs["budget_style"]`` where given, else the
    registered task's own (``"numeric"`` for TrainingWheels-SyntheticNumeric-v0, ``"keyword"`` otherwise);
    what configs check their budgets against before anything is loaded."""
    if env_kwargs and "budget_style" in env_kwargs:
        return str(env_kwargs["budget_style"])
    registered = REGISTERED.get(env_id)
    if registered is None or registered.embedded is None:
        return "keyword"
    from tw_env.synthetic import embedded_pair

    return embedded_pair(registered.embedded).budget_style


_UNSET: Any = object()  # "not given": lets teacher_prompt=None mean "the student's prompt"


def make_task(
    env_id: str,
    *,
    teacher: str | PreTrainedModel | None = None,
    student: str | PreTrainedModel | None = None,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    data: str | None = None,
    split: str | None = None,
    config: str | None = None,
    limit: int | None = None,
    source_field: str | None = None,
    reference_field: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    max_new_tokens: int | None = None,
    max_prompt_length: int | None = None,
    teacher_prompt: str | None = _UNSET,
    **build_kwargs: Any,
) -> Task:
    """The :class:`~tw_env.task.Task` of a registered id, with any part overridden.

    Hub tasks (XSum, WMT19): teacher ``google/flan-t5-xl``, student ``google/flan-t5-small`` (its
    tokenizer too) and the hub dataset by default; any of them may be a local directory or file
    (a folder of data gives its ``{split}`` file). A decoder-only pair (two ``AutoModelForCausalLM``
    models sharing a vocabulary, e.g. ``Qwen/Qwen3-1.7B`` with ``Qwen/Qwen3-0.6B``) reads its prompts
    through the tokenizer's chat template when it has one (``chat_template=False``: ``"{prompt}\n"``
    instead), see :class:`~tw_env.prompts.PromptFormat`. The embedded task trains and caches its models
    and data on first use (``cache_dir``, ``seed``). ``teacher_prompt`` defaults to the id's
    (pass None for the student's prompt). Further keywords (``budgets``, ``device``, ``dtype``,
    ``metric``, ``instruction``, ``examples``, ``prompt_format``, ``chat_template``) go to :meth:`Task.build`.
    """
    registered = registered_task(env_id)
    if registered.spec is None:
        parts = _embedded_parts(registered, cache_dir, seed, teacher, student, tokenizer, data)
    else:
        parts = _hub_parts(registered.spec, teacher, student, tokenizer, data, config, source_field, reference_field)
    if parts.prompt_format is not None and "chat_template" not in build_kwargs:
        build_kwargs.setdefault("prompt_format", parts.prompt_format)
    if parts.budget_style is not None:
        build_kwargs.setdefault("budget_style", parts.budget_style)
    if "examples" not in build_kwargs:
        build_kwargs["examples"] = load_examples(
            parts.data, *parts.fields, split=split or parts.split, config=parts.config, limit=limit
        )
    build_kwargs.setdefault("instruction", parts.instruction)
    build_kwargs.setdefault("metric", parts.metric)
    return Task.build(
        # Known gap: a student given as a loaded model (without a tokenizer) reaches load_tokenizer as is.
        teacher=parts.teacher, student=parts.student, tokenizer=parts.tokenizer,  # type: ignore[arg-type]
        max_new_tokens=max_new_tokens if max_new_tokens is not None else registered.max_new_tokens,
        max_prompt_length=max_prompt_length if max_prompt_length is not None else registered.max_prompt_length,
        teacher_prompt=registered.teacher_prompt if teacher_prompt is _UNSET else teacher_prompt,
        **build_kwargs,
    )


@dataclass(frozen=True)
class _Parts:
    """What :func:`make_task` builds a registered task from, overrides applied."""

    teacher: str | PreTrainedModel
    student: str | PreTrainedModel
    tokenizer: str | PreTrainedTokenizerBase | PreTrainedModel  # the student's name by default
    data: str
    config: str | None  # the hub dataset's configuration
    fields: tuple[str, str]  # the source and reference fields of the data
    split: str  # the split read when none is given
    instruction: str
    metric: str
    prompt_format: str | None = None  # the prompt format the models need unless the caller says otherwise
    budget_style: str | None = None  # how the prompts state the budget, where not the default (keyword)


def _hub_parts(
    spec: TaskSpec, teacher: str | PreTrainedModel | None, student: str | PreTrainedModel | None,
    tokenizer: str | PreTrainedTokenizerBase | None, data: str | None, config: str | None,
    source_field: str | None, reference_field: str | None,
) -> _Parts:
    """A hub task's parts: FLAN-T5 models and the hub dataset unless overridden."""
    teacher = teacher if teacher is not None else FLAN_T5_XL
    student = student if student is not None else FLAN_T5_SMALL
    data, config = (data, config) if data is not None else (spec.default_data, config or spec.default_config)
    return _Parts(
        teacher, student, tokenizer if tokenizer is not None else student, data, config,
        (source_field or spec.source_field, reference_field or spec.reference_field), spec.default_split,
        spec.instruction, spec.metric,
    )


def _embedded_parts(
    registered: RegisteredTask, cache_dir: str | None, seed: int, teacher: str | PreTrainedModel | None,
    student: str | PreTrainedModel | None, tokenizer: str | PreTrainedTokenizerBase | None, data: str | None,
) -> _Parts:
    """An embedded task's models and data folder; trains and caches its pair on first use (minutes, CPU)."""
    from tw_env.synthetic import SYNTHETIC_INSTRUCTION, embedded_pair, ensure_synthetic_models

    pair = embedded_pair(str(registered.embedded))
    if teacher is None or student is None or tokenizer is None or data is None:
        assets = ensure_synthetic_models(cache_dir=cache_dir, seed=seed, pair=pair)
        teacher = teacher if teacher is not None else str(assets.teacher_dir)
        student = student if student is not None else str(assets.student_dir)
        tokenizer = tokenizer if tokenizer is not None else str(assets.tokenizer_dir)
        data = data if data is not None else str(assets.data_dir)  # a folder of split files
    return _Parts(teacher, student, tokenizer, data, None, ("source", "target"), "train", SYNTHETIC_INSTRUCTION,
                  "bleu", pair.prompt_format, None if pair.budget_style == "keyword" else pair.budget_style)


def split_env_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``gym.make`` keywords → (the env's options, the task's keywords)."""
    options = {k: kwargs[k] for k in ENV_OPTIONS if k in kwargs}
    return options, {k: v for k, v in kwargs.items() if k not in options}


def make_env(env_id: str, **kwargs: Any) -> TeacherAssistedDecodingEnv:
    """The single env of a registered id (what ``gym.make(env_id, **kwargs)`` calls)."""
    options, task_kwargs = split_env_options(kwargs)
    return TeacherAssistedDecodingEnv(make_task(env_id, **task_kwargs), **options)


def make_vector_env(env_id: str, num_envs: int, **kwargs: Any) -> TeacherAssistedDecodingVectorEnv:
    """The native vector env of a registered id (``gym.make_vec(..., vectorization_mode="vector_entry_point")``)."""
    options, task_kwargs = split_env_options(kwargs)
    return TeacherAssistedDecodingVectorEnv(num_envs, make_task(env_id, **task_kwargs), **options)


def _entry_points(task: RegisteredTask) -> dict[str, Callable[..., Any]]:
    """The two functions Gymnasium's entry points name for ``task``, by name."""

    def single(**kwargs: Any) -> TeacherAssistedDecodingEnv:
        return make_env(task.env_id, **kwargs)

    def vector(num_envs: int, **kwargs: Any) -> TeacherAssistedDecodingVectorEnv:
        return make_vector_env(task.env_id, num_envs, **kwargs)

    functions: dict[str, Callable[..., Any]] = {}
    for fn, kind, entry_point in ((single, "single", task.entry_point), (vector, "vector", task.vector_entry_point)):
        fn.__name__ = fn.__qualname__ = entry_point.split(":")[1]
        fn.__doc__ = (f"The {kind} env of {task.env_id}. Defaults: {task.defaults()}; the teacher reads "
                      f"{task.teacher_prompt!r} (teacher_prompt=None: the student's prompt). Keywords as "
                      ":func:`make_task`, plus the env's options.")
        functions[fn.__name__] = fn
    return functions


ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    name: fn for task in TASKS for name, fn in _entry_points(task).items()
}


def __getattr__(name: str) -> Callable[..., Any]:
    """``make_{name}_env`` / ``make_{name}_vector_env`` of a registered task (what its entry points load)."""
    if name in ENTRY_POINTS:
        return ENTRY_POINTS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
