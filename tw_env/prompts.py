"""Every prompt of the library in one place: Table 1, the templates, their validation, batched encoding.

The student reads Y = ``"With {keyword} teacher use, {instruction}: {source}"`` (§5.1, Table 1).
The teacher reads its own prompt C^(T) (§2.3), by default the task without the budget clause,
which is for the student. GKD and the baselines (student alone, speculative decoding, the
confidence fallback) read a plain template as well. Env, trainer, GKD and evaluation all encode
through :func:`encode_texts`, so every component pads and truncates the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

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
# The task without the budget clause: the hub tasks' teacher prompt, GKD's and the baselines' prompt.
PLAIN_TEMPLATE = "{instruction}: {source}"
# The embedded teacher was trained on budget prompts only, so it reads the "no teacher use" one.
NO_TEACHER_USE_TEMPLATE = "With no teacher use, {instruction}: {source}"


def check_budget(budget: float) -> float:
    """Return ``budget`` as a float, or raise ValueError if it is not a fraction in [0, 1]."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number in [0, 1], got {budget!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"budget must be a teacher-use fraction in [0, 1], got {value}")
    return value


def keyword_for(budget: float) -> str:
    """The Table 1 keyword for ``budget``; raises ValueError for a budget without one."""
    key = round(float(budget), 6)
    for known, word in BUDGET_KEYWORDS.items():
        if abs(known - key) < 1e-6:
            return word
    raise ValueError(
        f"budget {budget!r} has no prompt keyword; expected one of {sorted(BUDGET_KEYWORDS)} (Table 1)"
    )


def make_prompt(instruction: str, source: str, budget: float) -> str:
    """The student's prompt Y: ``"With {keyword} teacher use, {instruction}: {source}"``."""
    return BUDGET_TEMPLATE.format(keyword=keyword_for(budget), instruction=instruction, source=source)


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


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[int]:
    """Token ids of one prompt, truncated to ``max_length`` (the tokenizer adds EOS as T5 expects)."""
    return list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one batched encoding of prompts: truncated to ``max_length``, right-padded with id 0."""
    return pad_token_lists([encode_text(tokenizer, t, max_length) for t in texts], device)
