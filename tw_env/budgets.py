"""Teacher-use budgets and the prompts that state them (the paper's Table 1)."""

from __future__ import annotations

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
    """The prompt Y: ``"With {keyword} teacher use, {instruction}: {source}"``."""
    return f"With {keyword_for(budget)} teacher use, {instruction}: {source}"


def check_budget(budget: float) -> float:
    """Return ``budget`` as a float, or raise ValueError if it is not a fraction in [0, 1]."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number in [0, 1], got {budget!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"budget must be a teacher-use fraction in [0, 1], got {value}")
    return value
