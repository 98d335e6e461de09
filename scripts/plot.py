"""`tw plot`: the operating-point figures and the token view from a `tw eval` results folder.

- ``operating_points.png``: latency against quality for every method, as the paper's Figures 1–2
  (X: quality, Y: median latency per example at batch size 1; lower right is best). Training Wheels
  is one line over its budgets (each point labelled with b), DistillSpec / speculative decoding one
  line per draft length over the lenience values, the fallback and Co-LLM one line over their
  thresholds, BiLD one line per rollback threshold α_RB over α_FB, the student and the teacher alone
  one marker each.
- ``operating_points_projected.png``: the same with the cost model's *projected* latency (teacher
  and student forwards per example × per-forward costs; see :func:`agents.evaluation.projected_latency_ms`),
  titled as a projection with the costs' source. The costs are `tw eval`'s (given, or measured
  here) unless ``teacher_forward_ms`` / ``student_forward_ms`` are given to `tw plot`, which projects
  the recorded forwards to other hardware without decoding again.
- ``quality_vs_teacher_use.png``: quality against the token-level teacher-use fraction, same methods.
- ``teacher_use_vs_budget.png``: Training Wheels' achieved teacher fraction against the budget asked for,
  with the ideal diagonal (left), and its quality against the budget (right), one line per call rule (the
  checkpoint's, the raw ½, a threshold calibrated by `tw eval`): how well the budgets are kept, over any
  grid of budgets (numeric prompts: issue 31).
- ``token_view.html`` (and the terminal, with ANSI colours): a few Training Wheels outputs at each
  budget with the tokens the student asked the teacher for highlighted.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

from agents.methods import RAW_RULE

STYLES = {  # method -> (label, colour, marker)
    "student": ("student alone", "tab:gray", "s"),
    "teacher": ("teacher alone", "black", "*"),
    "training_wheels": ("Training Wheels", "tab:red", "o"),
    "distillspec": ("DistillSpec", "tab:blue", "^"),
    "speculative": ("lossy speculative (plain student)", "tab:cyan", "v"),
    "fallback": ("confidence fallback", "tab:green", "D"),
    "co_llm": ("Co-LLM (learnt deferral)", "tab:orange", "P"),
    "bild": ("BiLD (fallback + rollback)", "tab:olive", "h"),
    "kl_oracle": ("KL oracle choosing the calls (teacher at every token; a reference)", "tab:purple", "x"),
}
LINESTYLES = ["-", "--", ":", "-."]
ANSI_TEACHER = "\033[1;30;43m"  # bold black on yellow
ANSI_RESET = "\033[0m"
HTML_TEACHER_BACKGROUND = "#ffd54f"


@dataclass
class PlotConfig:
    """Operating-point plots and the token view from `tw eval` results (`tw plot`)."""

    results: str = "runs/eval"  # a `tw eval` output folder or its results.json
    output_dir: str | None = None  # where the figures go (None: the results folder)
    token_view_examples: int = 5  # Training Wheels examples shown per budget in the token view
    token_view_budget: float | None = None  # show only this budget in the token view (None: every budget)
    terminal: bool = True  # also print the token view to the terminal with ANSI colours
    teacher_forward_ms: float | None = None  # project with this cost of one teacher forward (None: tw eval's cost model)
    student_forward_ms: float | None = None  # project with this cost of one student forward (None: tw eval's cost model)
    cost_label: str = ""  # where the given costs come from, shown in the projected figure's title

    def validate(self) -> None:
        if self.token_view_examples < 0:
            raise ValueError(f"token_view_examples must be >= 0, got {self.token_view_examples}")
        from agents.evaluation import given_forward_costs

        given_forward_costs(self.teacher_forward_ms, self.student_forward_ms, self.cost_label)  # raises if half given


def load_results(path: str | Path) -> tuple[dict, Path]:
    """results.json (given directly or inside a folder) and the folder it is in."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no results at '{file}': run `tw eval --output-dir DIR` first and pass DIR")
    return json.loads(file.read_text()), file.parent


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _series(rows: list[dict], y_key: str, x_key: str = "quality") -> list[dict]:
    """Curves to draw: {method, label, points [(x, y, row)], annotate}, points without a value dropped."""
    curves: list[dict] = []
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)

    def points(group: list[dict], order: str | None) -> list:
        if order:
            group = sorted(group, key=lambda r: _number(r.get(order)))
        pts = [(_number(r.get(x_key)), _number(r.get(y_key)), r) for r in group]
        return [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]

    for method, group in by_method.items():
        label = STYLES.get(method, (method, None, None))[0]
        if method in ("distillspec", "speculative"):
            for k in sorted({r.get("draft_length") for r in group}, key=lambda k: -1 if k is None else k):
                curves.append({"method": method, "label": f"{label} K={k}", "variant": k,
                               "points": points([r for r in group if r.get("draft_length") == k], "lenience")})
        elif method == "training_wheels":
            # The checkpoint's own call rule (tw train's calibrated thresholds, or ½), the raw rule π(<τ>) > ½
            # beside it where those differ, and (tw eval's tw_calibrate) a threshold calibrated after training.
            def variant(r: dict) -> str:
                if r.get("calibrated_for") is not None:
                    return "calibrated"
                return "raw" if str(r.get("setting", "")).endswith(RAW_RULE) else "own"

            names = {"own": label, "raw": f"{label}, raw rule π(<τ>) > ½",
                     "calibrated": f"{label}, call threshold calibrated by tw eval"}
            for kind in ("own", "raw", "calibrated"):
                rows_ = [r for r in group if variant(r) == kind]
                if rows_:
                    curves.append({"method": method, "label": names[kind], "variant": kind,
                                   "points": points(rows_, "budget"), "annotate": "budget"})
        elif method in ("fallback", "co_llm"):
            curves.append({"method": method, "label": label, "points": points(group, "threshold")})
        elif method == "bild":  # one line per α_RB over α_FB
            for rollback in sorted({_number(r.get("rollback_threshold")) for r in group}):
                curves.append({"method": method, "label": f"{label} α_RB={rollback:g}", "variant": rollback,
                               "points": points([r for r in group if _number(r.get("rollback_threshold")) == rollback],
                                                "threshold")})
        elif method == "kl_oracle":
            curves.append({"method": method, "label": label, "points": points(group, "budget")})
        else:
            curves.append({"method": method, "label": label, "points": points(group, None)})
    return curves


def _draw(ax, curves: list[dict]) -> int:
    variants: dict[str, list] = {}
    drawn = 0
    for curve in curves:
        if not curve["points"]:
            continue
        _, colour, marker = STYLES.get(curve["method"], (None, None, "o"))
        seen = variants.setdefault(curve["method"], [])
        if curve.get("variant") not in seen:
            seen.append(curve.get("variant"))
        style = LINESTYLES[seen.index(curve.get("variant")) % len(LINESTYLES)]
        xs = [p[0] for p in curve["points"]]
        ys = [p[1] for p in curve["points"]]
        single = curve["method"] in ("student", "teacher")
        ax.plot(xs, ys, linestyle="none" if single else style, marker=marker, color=colour,
                markersize=11 if single else 6, label=curve["label"])
        drawn += len(xs)
        if curve.get("annotate") == "budget":
            for x, y, row in curve["points"]:
                ax.annotate(f"b={_number(row.get('budget')):g}", (x, y), textcoords="offset points",
                            xytext=(5, 5), fontsize=8, color=colour)
    return drawn


def _figure(curves: list[dict], xlabel: str, ylabel: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    if _draw(ax, curves):
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no values to plot (e.g. latency was not measured)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_operating_points(results: dict, path: Path) -> None:
    """Latency (ms per example, batch size 1) against quality: the paper's Figures 1–2."""
    metric = _metric_name(results)
    title = f"{results.get('env_id', '')}: latency vs quality ({results.get('device', '')})"
    _figure(_series(results["rows"], "latency_ms_median"), metric,
            "latency (ms per example, batch size 1, median)", title, path)


def project(results: dict, config: PlotConfig) -> tuple[list[dict], str]:
    """The rows with ``projected_latency_ms`` under the plot's given costs (else as `tw eval` wrote
    them) and the costs' description."""
    from agents.evaluation import ForwardCosts, given_forward_costs, with_projected_latency

    rows = results["rows"]
    costs = given_forward_costs(config.teacher_forward_ms, config.student_forward_ms, config.cost_label)
    if costs is None:
        model = results.get("cost_model")
        if not model:
            return rows, "no cost model (tw eval had no teacher- and student-alone latency)"
        return rows, ForwardCosts(**model).describe()  # tw eval's rows already hold its projection
    return with_projected_latency(rows, costs), costs.describe()


def plot_projected_operating_points(results: dict, config: PlotConfig, path: Path) -> None:
    """Projected latency (cost model) against quality, titled as a projection."""
    rows, description = project(results, config)
    title = f"PROJECTION, not measured: {results.get('env_id', '')}\n{description}"
    _figure(_series(rows, "projected_latency_ms"), _metric_name(results),
            "projected latency (ms per example, batch size 1)", title, path)


def plot_quality_vs_teacher_use(results: dict, path: Path) -> None:
    """Quality against the token-level teacher-use fraction."""
    metric = _metric_name(results)
    title = f"{results.get('env_id', '')}: quality vs teacher use"
    _figure(_series(results["rows"], "quality", x_key="teacher_fraction"),
            "teacher-use fraction (teacher tokens / output tokens)", metric, title, path)


def budget_curves(rows: list[dict]) -> dict[str, list[tuple[float, float, float]]]:
    """Training Wheels' (budget, teacher fraction, quality) per call rule ("checkpoint rule", "raw rule π > ½",
    "calibrated by tw eval"), sorted by budget; calibrated rows are placed at the budget they were calibrated to."""
    names = {"own": "checkpoint rule", "raw": "raw rule π(<τ>) > ½", "calibrated": "calibrated by tw eval"}
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        if row.get("method") != "training_wheels" or row.get("budget") is None:
            continue
        kind = ("calibrated" if row.get("calibrated_for") is not None
                else "raw" if str(row.get("setting", "")).endswith(RAW_RULE) else "own")
        curves.setdefault(names[kind], []).append(
            (float(row["budget"]), _number(row.get("teacher_fraction")), _number(row.get("quality"))))
    return {name: sorted(points) for name, points in curves.items()}


def plot_teacher_use_vs_budget(results: dict, path: Path) -> None:
    """Achieved teacher fraction against the budget asked for (with the diagonal), and quality against it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = budget_curves(results["rows"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    budgets = [b for points in curves.values() for b, _, _ in points]
    top = max(budgets + [0.5]) if budgets else 0.5
    left.plot([0, top], [0, top], color="gray", linestyle=":", label="ideal: f = b")
    for (name, points), style in zip(curves.items(), LINESTYLES, strict=False):
        left.plot([b for b, _, _ in points], [f for _, f, _ in points], marker="o", linestyle=style,
                  color=STYLES["training_wheels"][1], label=name)
        right.plot([b for b, _, _ in points], [q for _, _, q in points], marker="o", linestyle=style,
                   color=STYLES["training_wheels"][1], label=name)
    for row in results["rows"]:
        if row.get("method") in ("student", "teacher") and row.get("quality") is not None:
            right.axhline(row["quality"], color=STYLES[row["method"]][1], linestyle="--", linewidth=0.8,
                          label=STYLES[row["method"]][0])
    left.set(xlabel="budget asked for, b", ylabel="teacher-use fraction achieved, f",
             title=f"{results.get('env_id', '')}: teacher use against budget")
    right.set(xlabel="budget asked for, b", ylabel=_metric_name(results), title="quality against budget")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if not curves:
        left.text(0.5, 0.5, "no Training Wheels rows", ha="center", va="center", transform=left.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _metric_name(results: dict) -> str:
    metric = results.get("metric") or (results["rows"][0]["metric"] if results.get("rows") else "")
    return {"bleu": "BLEU", "rouge2": "ROUGE-2"}.get(metric, metric or "quality")


# ---------------------------------------------------------------------------------------------- token view
def token_view_records(outputs_path: Path, per_budget: int, budget: float | None) -> dict[float, list[dict]]:
    """The first ``per_budget`` Training Wheels records of each budget (or of ``budget`` only), under
    the policy's own call rule (rows with a calibrated call threshold are left out)."""
    chosen: dict[float, list[dict]] = {}
    if not outputs_path.exists():
        return chosen
    with open(outputs_path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("method") != "training_wheels" or "tokens" not in record:
                continue
            if record.get("calibrated_for") is not None:
                continue
            b = float(record["budget"])
            if budget is not None and abs(b - float(budget)) > 1e-6:
                continue
            group = chosen.setdefault(b, [])
            if len(group) < per_budget:
                group.append(record)
    return dict(sorted(chosen.items()))


def render_ansi(chosen: dict[float, list[dict]]) -> str:
    """The token view for a terminal: teacher tokens in bold black on yellow."""
    if not chosen:
        return "token view: no Training Wheels outputs (run `tw eval --tw-policy DIR`)"
    lines = [f"token view: {ANSI_TEACHER}teacher tokens{ANSI_RESET} highlighted, the rest the student's own"]
    for b, records in chosen.items():
        lines.append(f"\n== budget b={b:g} ==")
        for r in records:
            text = "".join(f"{ANSI_TEACHER}{t}{ANSI_RESET}" if teacher else t
                           for t, teacher in zip(r["tokens"], r["from_teacher"], strict=True))
            lines.append(f"[{r['index']}] ({100 * r['teacher_fraction']:.0f}% teacher) {text.strip()}")
    return "\n".join(lines)


def render_html(chosen: dict[float, list[dict]], title: str) -> str:
    """A standalone page: teacher tokens on a coloured background with a title attribute."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.6}"
        f".teacher{{background:{HTML_TEACHER_BACKGROUND};border-radius:3px}}"
        ".out{font-family:monospace;white-space:pre-wrap}.meta{color:#555;font-size:90%}</style>",
        "</head><body>", f"<h1>{esc(title)}</h1>",
        f'<p>Tokens on a <span class="teacher" style="background:{HTML_TEACHER_BACKGROUND}" '
        'title="teacher token">coloured background</span> came from the teacher (the student emitted '
        "&lt;τ&gt;); the others are the student's own.</p>",
    ]
    if not chosen:
        parts.append("<p>No Training Wheels outputs: run <code>tw eval --tw-policy DIR</code>.</p>")
    for b, records in chosen.items():
        parts.append(f"<h2>Budget b = {b:g}</h2>")
        for r in records:
            spans = []
            for position, (token, teacher) in enumerate(zip(r["tokens"], r["from_teacher"], strict=True)):
                if teacher:
                    tip = esc(f"teacher token (output position {position})")
                    spans.append(
                        f'<span class="teacher" style="background:{HTML_TEACHER_BACKGROUND}" '
                        f'title="{tip}">{esc(token)}</span>')
                else:
                    spans.append(esc(token))
            parts.append(
                f'<div class="example"><p class="meta">example {r["index"]}: '
                f'{100 * r["teacher_fraction"]:.0f}% teacher tokens</p>'
                f'<p class="meta">source: {esc(r.get("source", ""))}<br>reference: {esc(r.get("reference", ""))}</p>'
                f'<p class="out">{"".join(spans).strip()}</p></div>'
            )
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- run
def run(config: PlotConfig) -> dict:
    """Write the four figures and token_view.html; return their paths."""
    config.validate()
    results, folder = load_results(config.results)
    out = Path(config.output_dir) if config.output_dir else folder
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "operating_points": out / "operating_points.png",
        "operating_points_projected": out / "operating_points_projected.png",
        "quality_vs_teacher_use": out / "quality_vs_teacher_use.png",
        "teacher_use_vs_budget": out / "teacher_use_vs_budget.png",
        "token_view": out / "token_view.html",
    }
    plot_operating_points(results, files["operating_points"])
    plot_projected_operating_points(results, config, files["operating_points_projected"])
    plot_quality_vs_teacher_use(results, files["quality_vs_teacher_use"])
    plot_teacher_use_vs_budget(results, files["teacher_use_vs_budget"])
    chosen = token_view_records(folder / "outputs.jsonl", config.token_view_examples, config.token_view_budget)
    title = f"Where the student asked for help: {results.get('env_id', '')}"
    files["token_view"].write_text(render_html(chosen, title), encoding="utf-8")
    if config.terminal:
        print(render_ansi(chosen))
    from scripts.evaluate import format_table  # every row (tw eval prints a line per budget)

    print(format_table(results.get("rows", [])))
    print("figures: " + ", ".join(str(path) for path in files.values()))
    return {name: str(path) for name, path in files.items()}
