"""How well phase 2 keeps its budgets: the figures of docs/budget-control.md from `tw train` run folders.

    python scripts/budget_control_report.py runs/budget-control/t5-seed0-integral runs/budget-control/t5-seed0-pid \
        --figure docs/figures/budget-control-t5.png

For each run (its ``summary.json`` and TensorBoard logs) it prints one markdown table row: the
periodic evaluations after the first third of phase 2 that are within ``--tolerance`` of every
budget, the largest per-budget standard deviation of the evaluated teacher fraction over them, the
batch at which the run settled (every later evaluation within the tolerance on every budget), and
where it stopped and why. With ``--figure`` it draws, per run, the evaluated teacher fraction f_b and
λ_b (TensorBoard's ``lambda/b=…``) against the PCL batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tw_env.prompts import budget_label


def evaluations(run: Path) -> list[dict]:
    """The periodic evaluations of phase 2, in order: ``{"step", "fractions": {b: f}}``."""
    summary = json.loads((run / "summary.json").read_text())
    return [{"step": int(e["step"]), "fractions": {float(r["budget"]): float(r["teacher_fraction"]) for r in e["results"]}}
            for e in summary["phase2"]["selection"]["evaluations"]]


def control_figures(evals: list[dict], batches: int, tolerance: float) -> dict:
    """Within-tolerance count and per-budget sd after the first third of the ``batches`` phase 2 ran, and
    the batch the run settled at."""
    late = [e for e in evals if e["step"] > batches / 3]
    within = [all(abs(f - b) <= tolerance for b, f in e["fractions"].items()) for e in late]
    budgets = sorted(evals[0]["fractions"]) if evals else []
    sd = max((float(np.std([e["fractions"][b] for e in late])) for b in budgets), default=float("nan")) if late else float("nan")
    all_within = [all(abs(f - b) <= tolerance for b, f in e["fractions"].items()) for e in evals]
    settled = next((evals[i]["step"] for i in range(len(evals)) if all(all_within[i:])), None)
    return {"late": len(late), "late_within": int(sum(within)), "max_sd": sd, "settled_at": settled}


def lambdas(run: Path) -> dict[float, tuple[list[int], list[float]]]:
    """λ_b per PCL batch from the run's TensorBoard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()["scalars"]:
        if tag.startswith("lambda/b="):
            events = accumulator.Scalars(tag)
            out[float(tag.split("=")[1])] = ([e.step for e in events], [e.value for e in events])
    return out


def draw(runs: list[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(5 * len(runs), 6), squeeze=False, sharex=True)
    for column, run in enumerate(runs):
        evals = evaluations(run)
        for b in sorted(evals[0]["fractions"]):
            line, = axes[0][column].plot([e["step"] for e in evals], [e["fractions"][b] for e in evals], "o-", ms=3,
                                         label=f"b={budget_label(b)}")
            axes[0][column].axhline(b, color=line.get_color(), lw=0.6, ls=":")
        for b, (steps, values) in sorted(lambdas(run).items()):
            axes[1][column].plot(steps, values, lw=0.8, label=f"b={budget_label(b)}")
        axes[0][column].set(title=run.name, ylabel="teacher fraction (greedy, validation)")
        axes[1][column].set(xlabel="PCL batch", ylabel="λ_b")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="tw train output folders (phase 2 run)")
    parser.add_argument("--tolerance", type=float, default=0.03, help="|f − b| that counts as within the budget")
    parser.add_argument("--figure", type=Path, help="where to draw f_b and λ_b against the PCL batch")
    args = parser.parse_args(argv)
    print("| run | evaluations after the first third within tolerance | max per-budget sd of f | settled at | stopped |")
    print("| --- | --- | --- | --- | --- |")
    for run in args.runs:
        summary = json.loads((run / "summary.json").read_text())["phase2"]
        figures = control_figures(evaluations(run), int(summary["batches"]), args.tolerance)  # the batches run
        stop = summary.get("stop", {"step": summary["batches"], "reason": "ran every batch"})
        print(f"| {run.name} | {figures['late_within']} of {figures['late']} | {figures['max_sd']:.3f} | "
              f"{figures['settled_at']} | batch {stop['step']}: {stop['reason']} |")
    if args.figure:
        draw(args.runs, args.figure)
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
