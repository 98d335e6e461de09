"""Factories behind the registered ids. Every model and dataset is overridable by keyword."""

from __future__ import annotations

from typing import Any

from tw_env.env import TeacherAssistedDecodingEnv
from tw_env.tasks import WMT19, XSUM, TaskSpec, load_examples
from tw_env.vector_env import TeacherAssistedDecodingVectorEnv

FLAN_T5_XL = "google/flan-t5-xl"
FLAN_T5_SMALL = "google/flan-t5-small"
# The teacher's prompt C^(T): the task without the student's budget clause, which is not meant for it.
HUB_TEACHER_PROMPT = "{instruction}: {source}"
# The embedded teacher was trained on budget prompts only, so it reads the "no teacher use" one.
SYNTHETIC_TEACHER_PROMPT = "With no teacher use, {instruction}: {source}"


def _hub_task_kwargs(
    spec: TaskSpec, teacher: Any, student: Any, tokenizer: Any, data: str | None, split: str | None,
    config: str | None, limit: int | None, source_field: str | None, reference_field: str | None,
) -> dict[str, Any]:
    examples = load_examples(
        data or spec.default_data,
        source_field or spec.source_field,
        reference_field or spec.reference_field,
        split=split or spec.default_split,
        config=config if config is not None else (spec.default_config if data is None else None),
        limit=limit,
    )
    return dict(
        teacher=teacher, student=student, tokenizer=tokenizer if tokenizer is not None else student,
        examples=examples, instruction=spec.instruction, metric=spec.metric,
    )


def _hub_factory(spec: TaskSpec, vector: bool, max_new_tokens: int, max_prompt_length: int):
    def make(
        teacher: Any = FLAN_T5_XL, student: Any = FLAN_T5_SMALL, tokenizer: Any = None, data: str | None = None,
        split: str | None = None, config: str | None = None, limit: int | None = None,
        source_field: str | None = None, reference_field: str | None = None,
        max_new_tokens: int = max_new_tokens, max_prompt_length: int = max_prompt_length,
        teacher_prompt: str | None = HUB_TEACHER_PROMPT, **kwargs: Any,
    ):
        task = _hub_task_kwargs(spec, teacher, student, tokenizer, data, split, config, limit, source_field, reference_field)
        cls = TeacherAssistedDecodingVectorEnv if vector else TeacherAssistedDecodingEnv
        return cls(**task, max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length,
                   teacher_prompt=teacher_prompt, **kwargs)

    make.__doc__ = (
        f"Make the {spec.name} task ({'vector' if vector else 'single'} env). Defaults: teacher {FLAN_T5_XL}, "
        f"student {FLAN_T5_SMALL} (its tokenizer too), data {spec.default_data}; pass local directories/files "
        f"to override any of them. The teacher reads {HUB_TEACHER_PROMPT!r} (teacher_prompt=None: the student's prompt)."
    )
    return make


make_xsum_env = _hub_factory(XSUM, vector=False, max_new_tokens=64, max_prompt_length=512)
make_xsum_vector_env = _hub_factory(XSUM, vector=True, max_new_tokens=64, max_prompt_length=512)
make_wmt19_env = _hub_factory(WMT19, vector=False, max_new_tokens=64, max_prompt_length=128)
make_wmt19_vector_env = _hub_factory(WMT19, vector=True, max_new_tokens=64, max_prompt_length=128)


def synthetic_task_kwargs(
    split: str = "train", cache_dir: str | None = None, seed: int = 0, teacher: Any = None, student: Any = None,
    tokenizer: Any = None, data: str | None = None, limit: int | None = None,
) -> dict[str, Any]:
    """Arguments of the embedded task's env; trains and caches its models on first use (minutes, CPU).

    ``data``: a folder reads its ``{split}`` file (as the cache writes them), a file is read whole.
    """
    from tw_env.synthetic import SYNTHETIC_INSTRUCTION

    if teacher is None or student is None or tokenizer is None or data is None:
        from tw_env.synthetic import ensure_synthetic_models

        assets = ensure_synthetic_models(cache_dir=cache_dir, seed=seed)
        teacher = teacher if teacher is not None else str(assets.teacher_dir)
        student = student if student is not None else str(assets.student_dir)
        tokenizer = tokenizer if tokenizer is not None else str(assets.tokenizer_dir)
        data = data if data is not None else str(assets.data_dir)  # a folder of split files
    examples = load_examples(data, "source", "target", split=split, limit=limit)
    return dict(
        teacher=teacher, student=student, tokenizer=tokenizer, examples=examples,
        instruction=SYNTHETIC_INSTRUCTION, metric="bleu",
    )


def make_synthetic_env(
    split: str = "train", cache_dir: str | None = None, seed: int = 0, teacher: Any = None, student: Any = None,
    tokenizer: Any = None, data: str | None = None, limit: int | None = None, max_new_tokens: int = 20,
    max_prompt_length: int = 32, teacher_prompt: str | None = SYNTHETIC_TEACHER_PROMPT, **kwargs: Any,
) -> TeacherAssistedDecodingEnv:
    """The embedded task (no download): a synthetic translation language, see :mod:`tw_env.synthetic`."""
    task = synthetic_task_kwargs(split, cache_dir, seed, teacher, student, tokenizer, data, limit)
    return TeacherAssistedDecodingEnv(**task, max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length,
                                      teacher_prompt=teacher_prompt, **kwargs)


def make_synthetic_vector_env(
    num_envs: int, split: str = "train", cache_dir: str | None = None, seed: int = 0, teacher: Any = None,
    student: Any = None, tokenizer: Any = None, data: str | None = None, limit: int | None = None,
    max_new_tokens: int = 20, max_prompt_length: int = 32, teacher_prompt: str | None = SYNTHETIC_TEACHER_PROMPT,
    **kwargs: Any,
) -> TeacherAssistedDecodingVectorEnv:
    task = synthetic_task_kwargs(split, cache_dir, seed, teacher, student, tokenizer, data, limit)
    return TeacherAssistedDecodingVectorEnv(
        num_envs, **task, max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length,
        teacher_prompt=teacher_prompt, **kwargs
    )
