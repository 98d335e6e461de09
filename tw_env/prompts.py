"""Every prompt of the library in one place: Table 1, the templates, their validation, batched encoding.

The student reads Y = ``"With {keyword} teacher use, {instruction}: {source}"`` (§5.1, Table 1).
The teacher reads its own prompt C^(T) (§2.3), by default the task without the budget clause,
which is for the student. GKD and the baselines (student alone, speculative decoding, the
confidence fallback) read a plain template as well. Env, trainer, GKD and evaluation all encode
through :func:`encode_texts`, so every component pads and truncates the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

# Table 1 of the paper: the keyword placed in the prompt for each teacher-use fraction.
BUDGET_KEYWORDS: dict[float, str] = {
    0.0: "no",
    0.1: "light",
    0.2: "moderate-light",
    0.3: "moderate",
    0.4: "high",
    0.5: "very high",
}
BUDGETS: tuple[float, ...] = tuple(BUDGET_KEYWORDS)

BUDGET_TEMPLATE = "With {keyword} teacher use, {instruction}: {source}"
# Beyond the paper: any budget in [0, 1] as a number (issue 31), selected by a task's ``budget_style``.
NUMERIC_BUDGET_TEMPLATE = "With teacher use {value}, {instruction}: {source}"
# "numeric" writes the shortest decimal (0.1, 0.15, 0.125); "numeric-fixed" always three places (0.100,
# 0.150, 0.125), so that every budget is the same string shape and each digit keeps its place value.
BUDGET_STYLES = ("keyword", "numeric", "numeric-fixed")
NUMERIC_STYLES = ("numeric", "numeric-fixed")
BUDGET_DECIMALS = 3  # the numeric prompt writes budgets to 0.001
# The task without the budget clause: the hub tasks' teacher prompt, GKD's and the baselines' prompt.
PLAIN_TEMPLATE = "{instruction}: {source}"
# The embedded teacher was trained on budget prompts only, so it reads the "no teacher use" one.
NO_TEACHER_USE_TEMPLATE = "With no teacher use, {instruction}: {source}"
# The same for the embedded numeric-budget teacher, trained on numeric budget prompts only (with the keyword
# one it translates at 21 BLEU instead of 48 on 64 training rows: it never read "no").
NUMERIC_NO_TEACHER_USE_TEMPLATE = "With teacher use 0, {instruction}: {source}"


def check_budget(budget: float) -> float:
    """Return ``budget`` as a float (a number, or a string of one such as ``"0.3"``), or raise ValueError if
    it is not a fraction in [0, 1] (NaN and bools included: the message names the value and the range)."""
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a number in [0, 1], got {budget!r}")
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number in [0, 1], got {budget!r}") from None
    if not 0.0 <= value <= 1.0:  # also NaN
        raise ValueError(f"budget must be a teacher-use fraction in [0, 1], got {value}")
    return value


def check_budget_style(style: str) -> str:
    if style not in BUDGET_STYLES:
        raise ValueError(f"budget_style must be one of {list(BUDGET_STYLES)}, got {style!r}")
    return style


def is_numeric_style(style: str) -> bool:
    """Whether prompts of ``style`` state the budget as a number (any b in [0, 1] to 0.001)."""
    return check_budget_style(style) in NUMERIC_STYLES


def format_budget(budget: float, fixed: bool = False) -> str:
    """A budget as the numeric prompt writes it: a decimal fraction with at most three places, no
    trailing zeros (0 → "0", 0.1 → "0.1", 0.15 → "0.15", 0.025 → "0.025", 1 → "1"); ``fixed`` (style
    ``"numeric-fixed"``): always three places (0 → "0.000", 0.1 → "0.100", 0.15 → "0.150").

    Why fixed as well: a student trained on budgets drawn to 0.001 reads "0.1" (three characters) unlike
    the "0.125" and "0.075" around it, and a held-out "0.15" unlike either (docs/any-budget.md); with three
    places every budget has one shape and each digit one place value.

    Why this form: it is the number a user gives (`tw eval --budgets`, the env's ``budget`` option), with no
    unit to get wrong; a byte-level or BPE tokenizer reads it digit by digit (the de→en tokenizer: "0", ".",
    "1", "5"), and T5's SentencePiece in pieces it has seen in pretraining ("▁0.", "15"; "0.1"). A budget
    with more places is refused rather than silently rounded: the prompt must say the budget asked for.
    """
    value = check_budget(budget)
    rounded = round(value, BUDGET_DECIMALS)
    if abs(rounded - value) > 1e-9:
        raise ValueError(f"budget {budget!r} has more than {BUDGET_DECIMALS} decimal places; the numeric prompt "
                         "writes budgets to 0.001 (e.g. 0.15, 0.025)")
    written = f"{rounded:.{BUDGET_DECIMALS}f}"
    return written if fixed else written.rstrip("0").rstrip(".")


def budget_label(budget: float) -> str:
    """A budget as logs and plots name it: one decimal for the tenths (0 → "0.0", 0.1 → "0.1": the Table 1
    budgets' names in every TensorBoard log so far), else as the numeric prompt writes it (0.025 →
    "0.025"), so that two budgets never share a name."""
    tenths = round(budget * 10)
    return f"{budget:.1f}" if abs(budget * 10 - tenths) < 1e-9 else format_budget(budget)


def keyword_for(budget: float) -> str:
    """The Table 1 keyword for ``budget``; raises ValueError for a budget without one."""
    key = round(float(budget), 6)
    for known, word in BUDGET_KEYWORDS.items():
        if abs(known - key) < 1e-6:
            return word
    raise ValueError(
        f"budget {budget!r} has no prompt keyword; expected one of {sorted(BUDGET_KEYWORDS)} (Table 1), "
        "or budget_style 'numeric' for any budget in [0, 1]"
    )


def make_prompt(instruction: str, source: str, budget: float, style: str = "keyword") -> str:
    """The student's prompt Y: ``"With {keyword} teacher use, {instruction}: {source}"`` (the paper's Table 1
    keywords, style ``"keyword"``), or ``"With teacher use {value}, {instruction}: {source}"`` for any
    budget in [0, 1] (styles ``"numeric"`` and ``"numeric-fixed"``, :func:`format_budget`)."""
    if is_numeric_style(style):
        value = format_budget(budget, fixed=style == "numeric-fixed")
        return NUMERIC_BUDGET_TEMPLATE.format(value=value, instruction=instruction, source=source)
    return BUDGET_TEMPLATE.format(keyword=keyword_for(budget), instruction=instruction, source=source)


def budget_of_prompt(prompt: str) -> float | None:
    """The budget a student prompt states (either style), None if it states none: the inverse of
    :func:`make_prompt` on its budget clause."""
    numeric = "With teacher use "
    if prompt.startswith(numeric):
        value = prompt[len(numeric):].split(",", 1)[0]
        try:
            return check_budget(float(value))
        except ValueError:
            return None
    for budget, keyword in BUDGET_KEYWORDS.items():
        if prompt.startswith(f"With {keyword} teacher use, "):
            return budget
    return None


# The numeric budget clause of NUMERIC_BUDGET_TEMPLATE, wherever it stands in a text (a chat template may
# come first) and with any spaces a tokenizer's decode put inside the number.
_NUMERIC_CLAUSE = re.compile(re.escape(NUMERIC_BUDGET_TEMPLATE.split("{value}")[0].strip()) +
                             r"\s*([0-9]+(?:\s*\.\s*[0-9]+)?)\s*,")


def numeric_budget_in(text: str) -> float | None:
    """The budget a numeric prompt states anywhere in ``text``, None if none (or outside [0, 1]):
    "... With teacher use 0.150, translate ..." → 0.15. What a policy reading the budget's value parses
    from its decoded prompt ids (:meth:`agents.policy.StudentPolicy.read_budget_value`)."""
    found = _NUMERIC_CLAUSE.search(text)
    if found is None:
        return None
    try:
        return check_budget(float(re.sub(r"\s", "", found.group(1))))
    except ValueError:
        return None


def check_budgets_for_style(budgets: Sequence[float], style: str) -> tuple[float, ...]:
    """``budgets`` as floats, each one the style can write (a Table 1 keyword; or a number in [0, 1] to 0.001)."""
    checked = tuple(check_budget(b) for b in budgets)
    for b in checked:
        if is_numeric_style(style):
            format_budget(b)
        else:
            keyword_for(b)
    return checked


def check_template(template: str | None, name: str = "prompt", allow_none: bool = False) -> str | None:
    """A template has a ``{source}`` field and at most ``{instruction}`` besides; returns it unchanged.

    ``allow_none`` accepts None (for the teacher's prompt: None means it reads the student's Y).
    """
    if template is None and allow_none:
        return None
    problem = None
    if not isinstance(template, str) or "{source}" not in template:
        problem = "it has no {source} field"
    else:
        try:
            template.format(instruction="", source="")
        except (KeyError, IndexError, ValueError) as error:
            problem = f"it may only use the fields {{instruction}} and {{source}} ({type(error).__name__}: {error})"
    if problem:
        expected = "None or a template" if allow_none else "a template"
        raise ValueError(f"{name} {template!r} is not usable: {problem}; expected {expected} such as {PLAIN_TEMPLATE!r}")
    return template


def fill_template(template: str, instruction: str, source: str) -> str:
    """A plain (budget-free) prompt from a template checked by :func:`check_template`."""
    return template.format(instruction=instruction, source=source)


def pad_token_lists(
    encoded: Sequence[Sequence[int]], device: torch.device | str | None = None, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token-id lists into ``[B, L]`` ids and an attention mask (a list may be empty: a causal
    teacher's context for a one-token prompt)."""
    if not encoded:
        raise ValueError("nothing to pad: expected at least one token list")
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(list(e), dtype=torch.long)
        mask[i, : len(e)] = 1
    return ids.to(device), mask.to(device)


PROMPT_FORMATS = ("text", "plain", "chat")


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt's text becomes the ids a model reads (the same for every prompt of a task).

    - ``"text"``: the text as the tokenizer encodes it, with its special tokens (T5 appends EOS).
      T5's format, and the embedded causal task's (its models were trained on exactly this).
    - ``"plain"``: a decoder-only model's plain continuation, ``"{prompt}\n"``, with the tokenizer's
      special tokens (a Llama tokenizer prepends BOS): the output follows the newline.
    - ``"chat"``: one user turn through the tokenizer's chat template, with the generation prompt
      (``apply_chat_template(..., add_generation_prompt=True)``): what an instruction-tuned causal
      model expects; the output is the assistant's reply.

    A prompt longer than ``max_length`` loses the end of its *text*, never the format's wrapping
    (a chat template's closing and generation-prompt tokens, the newline).
    """

    kind: str = "text"

    def __post_init__(self) -> None:
        if self.kind not in PROMPT_FORMATS:
            raise ValueError(f"prompt format must be one of {list(PROMPT_FORMATS)}, got {self.kind!r}")

    def _ids(self, tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
        if self.kind == "plain":
            return list(tokenizer(text + "\n")["input_ids"])
        if self.kind == "chat":
            # The template rendered as text, then tokenised without adding special tokens: the
            # template writes them itself (a BOS would otherwise appear twice).
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
            return list(tokenizer(str(rendered), add_special_tokens=False)["input_ids"])
        return list(tokenizer(text)["input_ids"])

    def encode(self, tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[int]:
        """Token ids of one prompt, at most ``max_length`` of them."""
        if self.kind == "text":
            return list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
        ids = self._ids(tokenizer, text)
        if len(ids) <= max_length:
            return ids
        # Cut the text, keep the wrapping: shorten the text's own tokens by the excess until it fits
        # (decoding and re-encoding a cut can move a token boundary, hence the loop).
        text_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        keep = len(text_ids) - (len(ids) - max_length)
        while keep > 0:
            ids = self._ids(tokenizer, str(tokenizer.decode(text_ids[:keep])))
            if len(ids) <= max_length:
                return ids
            keep -= len(ids) - max_length
        raise ValueError(
            f"max_prompt_length {max_length} is too short for the {self.kind!r} prompt format: its wrapping alone "
            f"takes {len(self._ids(tokenizer, ''))} tokens; expected a longer max_prompt_length"
        )


TEXT_FORMAT = PromptFormat("text")


class _DefaultPromptFormat(Protocol):
    """What :func:`resolve_prompt_format` asks of a model family (:class:`~tw_env.model_family.ModelFamily`)."""

    def default_prompt_format(self, tokenizer: PreTrainedTokenizerBase, chat_template: bool | None) -> PromptFormat:
        """The format of a task whose caller named none."""


def resolve_prompt_format(
    prompt_format: str | PromptFormat | None, family: _DefaultPromptFormat, tokenizer: PreTrainedTokenizerBase,
    chat_template: bool | None = None,
) -> PromptFormat:
    """The task's prompt format: the one asked for, else the model family's default (``"text"`` for an
    encoder-decoder pair; for a causal pair ``"chat"`` when the tokenizer has a chat template, unless
    ``chat_template=False``, else ``"plain"``). ``chat_template=True`` without a template in the tokenizer
    is an error."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has_template:
        raise ValueError("chat_template=True but the tokenizer has no chat template; expected a tokenizer with "
                         "one (tokenizer.chat_template), or chat_template=None/False")
    if prompt_format is not None:
        chosen = prompt_format if isinstance(prompt_format, PromptFormat) else PromptFormat(str(prompt_format))
        if chosen.kind == "chat" and not has_template:
            raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template; this one has none. "
                             "Expected prompt_format 'plain' or 'text' for it")
        if chat_template is not None and (chosen.kind == "chat") != chat_template:
            raise ValueError(f"prompt_format {chosen.kind!r} contradicts chat_template={chat_template}; give one of them")
        return chosen
    return family.default_prompt_format(tokenizer, chat_template)


def encode_text(
    tokenizer: PreTrainedTokenizerBase, text: str, max_length: int, prompt_format: PromptFormat = TEXT_FORMAT
) -> list[int]:
    """Token ids of one prompt, at most ``max_length`` (format ``"text"``: the tokenizer adds EOS as T5 expects)."""
    return prompt_format.encode(tokenizer, text, max_length)


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, device: torch.device | str | None = None,
    prompt_format: PromptFormat = TEXT_FORMAT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one batched encoding of prompts: at most ``max_length`` tokens each, right-padded with id 0."""
    return pad_token_lists([encode_text(tokenizer, t, max_length, prompt_format) for t in texts], device)
