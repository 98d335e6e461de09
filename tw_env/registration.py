"""The registered tasks: one factory, :func:`make_task`, from an id plus overrides; the env entry points are one-liners.

Every model and dataset is overridable by keyword, exactly as ``gym.make(id, **kwargs)`` takes them:
the task's keywords (teacher, student, tokenizer, data, split, ..., see :func:`make_task`) build the
:class:`~tw_env.task.Task`; the env's own keywords (``reward_clip``, ``teacher_sampling``, ...)
go to the env.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tw_env.env import ENV_OPTIONS, TeacherAssistedDecodingEnv
from tw_env.prompts import NO_TEACHER_USE_TEMPLATE, PLAIN_TEMPLATE
from tw_env.task import Task
from tw_env.tasks import WMT19, XSUM, TaskSpec, load_examples
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


@dataclass(frozen=True)
class Registered:
    """What a registered id adds to a :class:`~tw_env.tasks.TaskSpec`: default models and lengths."""

    spec: TaskSpec | None  # None: an embedded task (models and data made on first use)
    max_new_tokens: int
    max_prompt_length: int
    teacher_prompt: str
    causal: bool = False  # the embedded task's decoder-only pair (TrainingWheels-SyntheticCausal-v0)


REGISTERED: dict[str, Registered] = {
    XSUM_ID: Registered(XSUM, max_new_tokens=64, max_prompt_length=512, teacher_prompt=HUB_TEACHER_PROMPT),
    WMT19_ID: Registered(WMT19, max_new_tokens=64, max_prompt_length=128, teacher_prompt=HUB_TEACHER_PROMPT),
    SYNTHETIC_ID: Registered(None, max_new_tokens=20, max_prompt_length=32, teacher_prompt=SYNTHETIC_TEACHER_PROMPT),
    SYNTHETIC_CAUSAL_ID: Registered(None, max_new_tokens=20, max_prompt_length=32,
                                    teacher_prompt=SYNTHETIC_TEACHER_PROMPT, causal=True),
}

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
    if env_id not in REGISTERED:
        raise ValueError(f"unknown task id {env_id!r}; expected one of {sorted(REGISTERED)}")
    registered = REGISTERED[env_id]
    spec = registered.spec
    tokenizer_or_student: str | PreTrainedTokenizerBase | PreTrainedModel  # the student's name by default
    if spec is None:
        teacher, student, tokenizer_or_student, data = _synthetic_parts(
            cache_dir, seed, teacher, student, tokenizer, data, causal=registered.causal
        )
        instruction, metric, fields = _synthetic_instruction(), "bleu", ("source", "target")
        dataset_config = None
        if registered.causal and "chat_template" not in build_kwargs:
            # The embedded causal models were trained on the prompt text as the tokenizer encodes it
            # (ending in EOS), not on a chat template or a newline.
            build_kwargs.setdefault("prompt_format", "text")
    else:
        teacher = teacher if teacher is not None else FLAN_T5_XL
        student = student if student is not None else FLAN_T5_SMALL
        tokenizer_or_student = tokenizer if tokenizer is not None else student
        data, dataset_config = (data, config) if data is not None else (spec.default_data, config or spec.default_config)
        instruction, metric = spec.instruction, spec.metric
        fields = (source_field or spec.source_field, reference_field or spec.reference_field)
    if "examples" not in build_kwargs:
        build_kwargs["examples"] = load_examples(
            data, *fields, split=split or (spec.default_split if spec else "train"), config=dataset_config, limit=limit
        )
    build_kwargs.setdefault("instruction", instruction)
    build_kwargs.setdefault("metric", metric)
    return Task.build(
        # Known gap: a student given as a loaded model (without a tokenizer) reaches load_tokenizer as is.
        teacher=teacher, student=student, tokenizer=tokenizer_or_student,  # type: ignore[arg-type]
        max_new_tokens=max_new_tokens if max_new_tokens is not None else registered.max_new_tokens,
        max_prompt_length=max_prompt_length if max_prompt_length is not None else registered.max_prompt_length,
        teacher_prompt=registered.teacher_prompt if teacher_prompt is _UNSET else teacher_prompt,
        **build_kwargs,
    )


def _synthetic_instruction() -> str:
    from tw_env.synthetic import SYNTHETIC_INSTRUCTION

    return SYNTHETIC_INSTRUCTION


def _synthetic_parts(
    cache_dir: str | None, seed: int, teacher: str | PreTrainedModel | None, student: str | PreTrainedModel | None,
    tokenizer: str | PreTrainedTokenizerBase | None, data: str | None, causal: bool = False,
) -> tuple[str | PreTrainedModel, str | PreTrainedModel, str | PreTrainedTokenizerBase, str]:
    """An embedded task's models and data folder; trains and caches them on first use (minutes, CPU)."""
    if teacher is None or student is None or tokenizer is None or data is None:
        from tw_env.synthetic import ensure_synthetic_models

        assets = ensure_synthetic_models(cache_dir=cache_dir, seed=seed, causal=causal)
        teacher = teacher if teacher is not None else str(assets.teacher_dir)
        student = student if student is not None else str(assets.student_dir)
        tokenizer = tokenizer if tokenizer is not None else str(assets.tokenizer_dir)
        data = data if data is not None else str(assets.data_dir)  # a folder of split files
    return teacher, student, tokenizer, data


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


def _entry_points(env_id: str) -> tuple[Callable[..., TeacherAssistedDecodingEnv], Callable[..., TeacherAssistedDecodingVectorEnv]]:
    def single(**kwargs: Any) -> TeacherAssistedDecodingEnv:
        return make_env(env_id, **kwargs)

    def vector(num_envs: int, **kwargs: Any) -> TeacherAssistedDecodingVectorEnv:
        return make_vector_env(env_id, num_envs, **kwargs)

    registered = REGISTERED[env_id]
    if registered.spec is None:
        pair = "Llama teacher and student" if registered.causal else "T5 teacher and student"
        defaults = f"a {pair}, and data, trained and cached on first use (tw_env.synthetic)"
    else:
        defaults = (f"teacher {FLAN_T5_XL}, student {FLAN_T5_SMALL} (its tokenizer too), data "
                    f"{registered.spec.default_data}; local directories/files override any of them")
    for fn, kind in ((single, "single"), (vector, "vector")):
        fn.__doc__ = (f"The {kind} env of {env_id}. Defaults: {defaults}; the teacher reads "
                      f"{registered.teacher_prompt!r} (teacher_prompt=None: the student's prompt). Keywords as "
                      ":func:`make_task`, plus the env's options.")
    return single, vector


make_xsum_env, make_xsum_vector_env = _entry_points(XSUM_ID)
make_wmt19_env, make_wmt19_vector_env = _entry_points(WMT19_ID)
make_synthetic_env, make_synthetic_vector_env = _entry_points(SYNTHETIC_ID)
make_synthetic_causal_env, make_synthetic_causal_vector_env = _entry_points(SYNTHETIC_CAUSAL_ID)
