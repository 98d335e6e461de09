"""The test-split figures of docs/budget-control.md from `tw eval` folders (RUN/eval-test/results.json)
that hold the student, the teacher and Training Wheels rows (the checkpoint's rule and the raw rule):

    python scripts/budget_test_summary.py runs/budget-control/shipped-seed0 runs/budget-control/shipped-seed1

Per run: the teacher fraction per budget under the checkpoint's rule, its largest miss and how many
budgets are within 0.03, the quality per budget, the raw rule's fractions, and the share of the
student–teacher gap closed at b = 0.2.
"""

from __future__ import annotations

import json
import sys

from agents.methods import RAW_RULE


def summarise(run: str) -> list[str]:
    rows = json.loads(open(f"{run}/eval-test/results.json").read())["rows"]
    alone = {r["method"]: r["quality"] for r in rows if r["setting"] == "alone"}
    student, teacher = alone["student"], alone["teacher"]
    tw = [r for r in rows if r["method"] == "training_wheels"]
    own = [r for r in tw if not r["setting"].endswith(RAW_RULE)]
    # The raw rule π(<τ>) > ½: its own row where the checkpoint's threshold differs from ½, else the same row.
    raw = {r["budget"]: r for r in own} | {r["budget"]: r for r in tw if r["setting"].endswith(RAW_RULE)}
    misses = [abs(r["teacher_fraction"] - r["budget"]) for r in own]
    at_02 = next(r for r in own if r["budget"] == 0.2)
    gap = 100 * (at_02["quality"] - student) / (teacher - student)
    return [
        f"{run}: student {student:.2f}, teacher {teacher:.2f}",
        "  checkpoint rule f: " + " ".join(f"{r['teacher_fraction']:.3f}" for r in own)
        + f"; largest miss {max(misses):.3f}; within 0.03: {sum(m <= 0.03 for m in misses)} of {len(own)}",
        "  checkpoint rule quality: " + " ".join(f"{r['quality']:.2f}" for r in own),
        "  raw rule f: " + " ".join(f"{raw[r['budget']]['teacher_fraction']:.3f}" for r in own)
        + f"; largest miss {max(abs(raw[r['budget']]['teacher_fraction'] - r['budget']) for r in own):.3f}",
        f"  gap closed at b = 0.2: {gap:.1f}% (quality {at_02['quality']:.2f} at f {at_02['teacher_fraction']:.3f})",
    ]


if __name__ == "__main__":
    for run in sys.argv[1:]:
        print("\n".join(summarise(run)))
