"""The task object: everything an env, a trainer, GKD and evaluation read, validated once.

A :class:`Task` bundles the loaded teacher, the tokenizer, the examples of one split, the
instruction, the metric, the budgets, the prompt templates and the lengths, plus the model family
(:mod:`tw_env.families`). ``Task.build`` checks and loads everything once; :func:`make_task`
builds the task of a registered id from overrides (the keywords ``gym.make`` takes). The envs
take a task, and so do the agents that never step an env (GKD, evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar, cast, overload

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from tw_env.families import ModelFamily, check_same_family, family_of
from tw_env.models import check_same_vocabulary, load_model, load_tokenizer, output_vocab_size
from tw_env.prompts import (
    BUDGETS,
    TEXT_FORMAT,
    PromptFormat,
    check_budgets_for_style,
    check_template,
    encode_text,
    encode_texts,
    fill_template,
    is_numeric_style,
    make_prompt,
    resolve_prompt_format,
)
from tw_env.tasks import Example

METRICS = ("bleu", "rouge2")


def as_examples(examples: Sequence[Any]) -> list[Example]:
    """Accept Examples, (source, reference) pairs or {"source", "reference"} dicts."""
    out = []
    for i, item in enumerate(examples):
        if isinstance(item, Example):
            out.append(item)
        elif isinstance(item, Mapping) and "source" in item and "reference" in item:
            out.append(Example(str(item["source"]), str(item["reference"])))
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
            out.append(Example(str(item[0]), str(item[1])))
        else:
            raise TypeError(
                f"example {i} is {item!r}; expected an Example, a (source, reference) pair or a dict with "
                "'source' and 'reference'"
            )
    if not out:
        raise ValueError("the task has no examples; expected at least one (source, reference) pair")
    return out


def check_reads_digits(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer that turns a numeric budget into unknown tokens (a word-level vocabulary without
    digits, such as the embedded synthetic language's): the student could not read its budget."""
    unk = tokenizer.unk_token_id
    ids = tokenizer("With teacher use 0.123456789", add_special_tokens=False)["input_ids"]
    if unk is not None and unk in ids:
        raise ValueError("budget_style 'numeric' needs a tokenizer that reads digits, but this one maps "
                         f"'0.123456789' to its unknown token {tokenizer.unk_token!r}; expected a subword or "
                         "byte-level tokenizer (T5's, a BPE one), or budget_style 'keyword'")


def _student_config(student: str | PreTrainedModel) -> PretrainedConfig:
    """The student's config, read without loading weights when given a name."""
    if isinstance(student, PreTrainedModel):
        return student.config
    from tw_env.models import _check_source

    return AutoConfig.from_pretrained(_check_source(str(student), "student"), trust_remote_code=False)


def _student_vocab_size(student: str | PreTrainedModel) -> int:
    if isinstance(student, PreTrainedModel):
        return output_vocab_size(student)
    return int(_student_config(student).vocab_size)


@dataclass(frozen=True, eq=False)
class Task:
    """A validated Training Wheels task. Build it with :meth:`build` (or :func:`make_task` for an id).

    Attributes:
        teacher: the loaded teacher LM (eval mode, on its device).
        tokenizer: the shared tokenizer.
        examples: the (source, reference) pairs of this split.
        instruction: e.g. ``"summarize"``; prompts read ``"... {instruction}: {source}"``.
        metric: ``"bleu"`` or ``"rouge2"``.
        budgets: the teacher-use budgets (each with a Table 1 keyword).
        teacher_prompt: the teacher's template C^(T), or None for the student's prompt Y.
        max_new_tokens: the decoding horizon at training and at test time.
        max_prompt_length: prompts are truncated to this many tokens.
        student: the task's default student (a name or a model), or None.
        family: the model family both models belong to (:mod:`tw_env.families`).
        prompt_format: how every prompt's text becomes ids (:class:`~tw_env.prompts.PromptFormat`:
            ``"text"`` for T5, a chat template or ``"{prompt}\n"`` for a causal pair).
    """

    teacher: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    examples: list[Example]
    instruction: str
    metric: str
    budgets: tuple[float, ...]
    teacher_prompt: str | None
    max_new_tokens: int
    max_prompt_length: int
    student: str | PreTrainedModel | None
    family: ModelFamily
    prompt_format: PromptFormat = TEXT_FORMAT
    budget_style: str = "keyword"  # how Y states the budget: Table 1's keywords, or "numeric" (any b in [0, 1])

    @classmethod
    def build(
        cls,
        teacher: str | PreTrainedModel,
        tokenizer: str | PreTrainedTokenizerBase,
        examples: Sequence[Any],
        instruction: str,
        metric: str = "bleu",
        budgets: Sequence[float] = BUDGETS,
        student: str | PreTrainedModel | None = None,
        max_new_tokens: int = 64,
        max_prompt_length: int = 512,
        teacher_prompt: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        teacher_device_map: str | dict[str, Any] | None = None,
        teacher_offload_folder: str | None = None,
        prompt_format: str | PromptFormat | None = None,
        chat_template: bool | None = None,
        budget_style: str = "keyword",
    ) -> Task:
        """Check every argument and load the teacher and tokenizer; raises before loading on bad input.

        Args:
            teacher: hub id, local directory or a loaded model, encoder-decoder (T5) or causal LM
                (Llama, Qwen2, Qwen3); the family is read from its config (:mod:`tw_env.families`).
            tokenizer: the (shared) tokenizer: hub id, directory or object.
            examples: (source, reference) pairs, Examples, or dicts with ``source``/``reference``.
            instruction: the task's instruction.
            metric: ``"bleu"`` or ``"rouge2"``.
            budgets: the budgets an episode may draw; each needs a Table 1 keyword (style ``"keyword"``)
                or is any number in [0, 1] to 0.001 (style ``"numeric"``).
            student: optional student (name or model): its family (the teacher's) and its vocabulary
                (the teacher's output layer) are checked, in that order.
            max_new_tokens, max_prompt_length: output horizon and prompt truncation.
            teacher_prompt: None (the teacher reads Y) or a template with ``{source}``.
            device, dtype: where and in which precision the teacher runs.
            teacher_device_map: a teacher too large for one device, spread over several
                (``"auto"`` or a ``{module: device}`` dict; :func:`~tw_env.models.load_model`);
                ``teacher_offload_folder`` keeps the modules it maps to ``"disk"``.
            prompt_format: ``"text"``, ``"plain"`` or ``"chat"`` (:class:`~tw_env.prompts.PromptFormat`);
                None: ``"text"`` for encoder-decoders; for a causal pair the tokenizer's chat template
                when it has one, else ``"plain"`` (``"{prompt}\n"``).
            chat_template: the switch for a causal pair's default: False never uses the chat template
                (``"plain"``), True requires one.
            budget_style: ``"keyword"`` (the paper: "With light teacher use, ...") or ``"numeric"``
                ("With teacher use 0.15, ..."; beyond the paper): then any budget in [0, 1] may be asked
                for, at reset and at decoding, and the tokenizer must read digits.
        """
        if max_new_tokens < 1 or max_prompt_length < 2:
            raise ValueError(
                f"max_new_tokens must be >= 1 and max_prompt_length >= 2, got {max_new_tokens} and {max_prompt_length}"
            )
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
        check_template(teacher_prompt, "teacher_prompt", allow_none=True)
        checked_budgets = check_budgets_for_style(budgets, budget_style)
        if not checked_budgets:
            raise ValueError("budgets must name at least one teacher-use budget")
        checked_examples = as_examples(examples)
        if prompt_format is not None and not isinstance(prompt_format, PromptFormat):
            PromptFormat(str(prompt_format))  # a bad name fails before anything is loaded
        loaded_tokenizer = load_tokenizer(tokenizer)
        loaded_teacher = load_model(teacher, role="teacher", device=device, dtype=dtype, device_map=teacher_device_map,
                                    offload_folder=teacher_offload_folder)
        vocab_size = output_vocab_size(loaded_teacher)
        family = family_of(loaded_teacher)
        if student is not None:
            check_same_family(loaded_teacher, _student_config(student))
            check_same_vocabulary(loaded_teacher, _student_vocab_size(student))
        if len(loaded_tokenizer) > vocab_size:
            raise ValueError(
                f"the tokenizer has {len(loaded_tokenizer)} entries but the teacher's output layer only "
                f"{vocab_size} rows; expected a tokenizer no larger than the model's vocabulary"
            )
        chosen_format = resolve_prompt_format(prompt_format, family, loaded_tokenizer,
                                              chat_template)
        if is_numeric_style(budget_style):
            check_reads_digits(loaded_tokenizer)
        return cls(
            prompt_format=chosen_format, teacher=loaded_teacher, tokenizer=loaded_tokenizer, examples=checked_examples, instruction=instruction,
            metric=metric, budgets=checked_budgets, teacher_prompt=teacher_prompt, max_new_tokens=int(max_new_tokens),
            max_prompt_length=int(max_prompt_length), student=student, family=family, budget_style=budget_style,
        )

    # ------------------------------------------------------------------ derived
    @property
    def vocab_size(self) -> int:
        """V: the rows of the teacher's output layer (the student's too); action V is <τ>."""
        return output_vocab_size(self.teacher)

    @property
    def eos_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.teacher.config.eos_token_id)

    def with_examples(self, examples: Sequence[Any]) -> Task:
        """The same task (same loaded models) on other examples, e.g. another split."""
        return replace(self, examples=as_examples(examples))

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, source: str, budget: float) -> list[int]:
        """Token ids of the student's prompt Y for ``source`` at ``budget``."""
        return encode_text(self.tokenizer, make_prompt(self.instruction, source, budget, self.budget_style),
                           self.max_prompt_length,
                           self.prompt_format)

    def encode_teacher_prompt(self, source: str, budget: float) -> list[int]:
        """Token ids of the teacher's prompt C^(T) (Y itself when the task has no ``teacher_prompt``)."""
        if self.teacher_prompt is None:
            return self.encode_prompt(source, budget)
        return self.encode_plain_prompt(source, self.teacher_prompt)

    def encode_plain_prompt(self, source: str, template: str) -> list[int]:
        """Token ids of a budget-free prompt (GKD's and the baselines')."""
        return encode_text(self.tokenizer, fill_template(template, self.instruction, source), self.max_prompt_length,
                           self.prompt_format)

    def prompts(
        self, sources: Sequence[str], budgets: Sequence[float], device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched student prompts Y: right-padded ``[B, L]`` ids and mask."""
        texts = [make_prompt(self.instruction, s, b, self.budget_style) for s, b in zip(sources, budgets, strict=True)]
        return encode_texts(self.tokenizer, texts, self.max_prompt_length, device, self.prompt_format)

    def teacher_prompts(
        self, sources: Sequence[str], budgets: Sequence[float], device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched teacher prompts C^(T) (as :meth:`encode_teacher_prompt`)."""
        if self.teacher_prompt is None:
            return self.prompts(sources, budgets, device)
        return self.plain_prompts(sources, self.teacher_prompt, device)

    def plain_prompts(
        self, sources: Sequence[str], template: str, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched budget-free prompts from ``template`` (checked here)."""
        check_template(template)
        texts = [fill_template(template, self.instruction, s) for s in sources]
        return encode_texts(self.tokenizer, texts, self.max_prompt_length, device, self.prompt_format)


T = TypeVar("T")


class FromTask(Generic[T]):
    """A read-only attribute of an object with a ``task`` that is the task's attribute of the same name
    (``env.teacher`` is ``env.task.teacher``): the task's public fields without a property apiece."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, env: None, owner: type | None = None) -> FromTask[T]: ...
    @overload
    def __get__(self, env: object, owner: type | None = None) -> T: ...
    def __get__(self, env: object | None, owner: type | None = None) -> FromTask[T] | T:
        if env is None:  # read on the class (help(), introspection): the descriptor itself
            return self
        return cast(T, getattr(env.task, self.name))  # type: ignore[attr-defined]
