"""The matched comparison of issue 30 from a `tw eval` results folder: per target teacher fraction, each
method's row at that fraction (Training Wheels: the checkpoint's own rule at budget b = f; the baselines:
their row calibrated to f on the calibration rows; DistillSpec: at the draft length the calibration rows
prefer), with quality, the achieved fraction, wasted tokens per
example and the projected latency. Markdown on stdout.

    python scripts/router_table.py runs/synthetic/eval [--fractions 0.1 0.2 0.3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agents.methods import RAW_RULE

ORDER = ("training_wheels", "co_llm", "bild", "distillspec", "fallback")
NAMES = {"training_wheels": "Training Wheels (checkpoint rule)", "co_llm": "Co-LLM", "bild": "BiLD",
         "distillspec": "DistillSpec", "fallback": "confidence fallback"}


def chosen_draft_length(results: dict, fraction: float) -> int | None:
    """DistillSpec calibrates a lenience per draft length K; the K kept for a target is chosen on the
    calibration (selection) rows as BiLD's α_RB is: the best quality among the K whose calibration lands
    within ``calibration_delta`` of the target, else the closest. None without a calibration report."""
    found = [c for c in results.get("distillspec_calibration") or [] if abs(c["target"] - fraction) < 1e-9]
    if not found:
        return None
    delta = results["config"].get("calibration_delta", 0.02)
    within = [c for c in found if abs(c["teacher_fraction"] - fraction) <= delta]
    best = max(within, key=lambda c: c["quality"]) if within else min(found, key=lambda c: abs(c["teacher_fraction"] - fraction))
    return int(best["draft_length"])


def row_at(results: dict, method: str, fraction: float) -> dict | None:
    """The method's row standing for teacher fraction ``fraction``."""
    draft_length = chosen_draft_length(results, fraction) if method == "distillspec" else None
    for row in results["rows"]:
        if row["method"] != method or (draft_length is not None and row.get("draft_length") != draft_length):
            continue
        if method == "training_wheels":
            if (row.get("budget") is not None and abs(row["budget"] - fraction) < 1e-9
                    and row.get("calibrated_for") is None and not row["setting"].endswith(RAW_RULE)):
                return row
        elif row.get("calibrated_for") is not None and abs(row["calibrated_for"] - fraction) < 1e-9:
            return row
    return None


def table(results: dict, fractions: list[float]) -> str:
    rows = results["rows"]
    alone = {r["method"]: r for r in rows if r["setting"] == "alone"}
    lines = [f"{results['examples']} {results['split']} examples of {results['env_id']}; quality: {results['metric']}"
             + "".join(f"; {m} alone {alone[m]['quality']:.2f}" for m in ("student", "teacher") if m in alone), "",
             "| target f | method | setting | teacher fraction | quality | wasted / example | projected latency ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in fractions:
        for method in ORDER:
            row = row_at(results, method, f)
            if row is None:
                continue
            projected = row.get("projected_latency_ms")
            lines.append(f"| {f:g} | {NAMES[method]} | {row['setting']} | {row['teacher_fraction']:.3f} | "
                         f"{row['quality']:.2f} | {row['wasted_per_example']:.2f} | "
                         f"{'-' if projected is None else format(projected, '.1f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a tw eval output folder or its results.json")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    args = parser.parse_args(argv)
    path = Path(args.results)
    results = json.loads((path / "results.json" if path.is_dir() else path).read_text())
    print(table(results, args.fractions))


if __name__ == "__main__":
    main()
