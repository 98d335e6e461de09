"""The tables of docs/any-budget.md from a numeric-prompt student's `tw eval` folder (issue 31):

    python scripts/any_budget_report.py runs/synthetic-numeric [--keyword runs/budget-control/shipped-seed0/eval-test]

Reads RUN/config.json (the budgets training drew: ``budgets``, ``budget_range``, ``budget_step``,
``budget_holdout``) and
RUN/eval/results.json (``tw eval`` with the student, the teacher and Training Wheels over a budget grid).
Prints one markdown row per budget asked for: whether training ever drew it, the teacher fraction under the
checkpoint's rule (and the raw rule π(<τ>) > ½), the miss, the quality; then the budgets never seen in
training (within 0.03? quality rising?) and, with ``--keyword``, the six Table 1 budgets beside a
keyword-prompt student's test rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agents.methods import RAW_RULE


def seen_budgets(config: dict) -> set[float]:
    """Every budget ``tw train`` could draw: the grid of ``budget_step`` on ``budget_range`` less
    ``budget_holdout``, or ``budgets``."""
    if config.get("budget_range") is None:
        return {round(float(b), 3) for b in config["budgets"]}
    lo, hi = (float(x) for x in config["budget_range"])
    step = float(config.get("budget_step", 0.001))
    grid = {round(lo + k * step, 3) for k in range(int(round((hi - lo) / step)) + 1)}
    return grid - {round(float(b), 3) for b in config.get("budget_holdout", [])}


def training_wheels_rows(results: Path) -> tuple[dict[float, dict], dict[float, dict], dict[str, float]]:
    """The checkpoint rule's rows and the raw rule's rows by budget, and the student's and teacher's quality."""
    rows = json.loads(results.read_text())["rows"]
    alone = {r["method"]: r["quality"] for r in rows if r["setting"] == "alone"}
    tw = [r for r in rows if r["method"] == "training_wheels"]
    own = {round(r["budget"], 3): r for r in tw if not r["setting"].endswith(RAW_RULE)}
    raw = own | {round(r["budget"], 3): r for r in tw if r["setting"].endswith(RAW_RULE)}
    return own, raw, alone


def alone_quality(alone: dict[str, float], method: str) -> str:
    """A model's own quality, or a note where that `tw eval` did not score it (``--methods`` without it)."""
    return f"{alone[method]:.2f}" if method in alone else "(not scored in this folder)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--results", type=Path, default=None, help="the tw eval folder (default RUN/eval)")
    parser.add_argument("--keyword", type=Path, default=None, help="a keyword-prompt student's tw eval folder")
    args = parser.parse_args()
    seen = seen_budgets(json.loads((args.run / "config.json").read_text()))
    own, raw, alone = training_wheels_rows((args.results or args.run / "eval") / "results.json")
    print(f"student alone {alone_quality(alone, 'student')}, teacher alone {alone_quality(alone, 'teacher')}\n")
    print("| b | drawn in training | f, checkpoint rule (c) | abs(f − b) | quality | f, raw rule π > ½ |")
    print("| --- | --- | --- | --- | --- | --- |")
    for b, r in sorted(own.items()):
        print(f"| {b:g} | {'yes' if b in seen else '**no**'} | {r['teacher_fraction']:.3f} ({r['threshold']:.3f}) "
              f"| {abs(r['teacher_fraction'] - b):.3f} | {r['quality']:.2f} | {raw[b]['teacher_fraction']:.3f} |")
    unseen = [b for b in sorted(own) if b not in seen]
    if unseen:
        misses = [abs(own[b]["teacher_fraction"] - b) for b in unseen]
        quality = [own[b]["quality"] for b in unseen]
        rising = all(q2 > q1 for q1, q2 in zip(quality, quality[1:], strict=False))
        print(f"\nbudgets never drawn in training: {' '.join(f'{b:g}' for b in unseen)}; within 0.03: "
              f"{sum(m <= 0.03 for m in misses)} of {len(unseen)} (largest miss {max(misses):.3f}); "
              f"quality {' '.join(f'{q:.2f}' for q in quality)} ({'rising' if rising else 'not strictly rising'})")
    if args.keyword is not None:
        key_own, _, key_alone = training_wheels_rows(args.keyword / "results.json")
        print(f"\nkeyword-prompt student ({args.keyword}): student alone {alone_quality(key_alone, 'student')}, "
              f"teacher alone {alone_quality(key_alone, 'teacher')}\n")
        print("| b | keyword prompts: f | quality | numeric prompts: f | quality |")
        print("| --- | --- | --- | --- | --- |")
        for b, r in sorted(key_own.items()):
            if b in own:
                print(f"| {b:g} | {r['teacher_fraction']:.3f} | {r['quality']:.2f} | "
                      f"{own[b]['teacher_fraction']:.3f} | {own[b]['quality']:.2f} |")


if __name__ == "__main__":
    main()
