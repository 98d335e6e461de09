"""What `tw train`, `tw gkd` and `tw eval` print as they end: a short table per budget and where the
files are; the whole summary stays in summary.json / results.json."""

from __future__ import annotations

import json
from pathlib import Path

from agents.config import config_to_json
from agents.run import end_report
from agents.train import TrainConfig
from scripts.evaluate import end_of_evaluation
from tests.tiny_task import only_family


@only_family("encoder-decoder")  # the printing reads the summary, not the models
def test_tw_train_ends_with_a_short_table_and_where_the_files_are(family, family_task, tmp_path, capsys):
    from scripts.cli import main

    out = tmp_path / "run"
    config = TrainConfig(
        env_id="TrainingWheels-Synthetic-v0", env_kwargs=family_task.env_kwargs(), output_dir=str(out),
        max_new_tokens=5, bc_batches=2, bc_batch_size=6, pcl_batches=2, num_envs=6, replay_per_update=4,
        eval_every=0, eval_examples=8, checkpoint_every=10, threads=1, device="cpu",
    )
    path = tmp_path / "train.json"
    path.write_text(config_to_json(config))
    assert main(["train", "--config", str(path)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) < 25, "\n".join(printed)
    text = "\n".join(printed)
    assert str(out / "summary.json") in text and str(out / "best") in text
    assert not any(line.lstrip().startswith(("{", '"')) for line in printed)  # no JSON dump
    summary = json.loads((out / "summary.json").read_text())["phase2"]
    rows = {line.split()[0]: line.split()[1:] for line in printed if line.startswith("  ") and line.split()[0][0].isdigit()}
    shipped = {e["budget"]: e for e in json.loads((out / "summary.json").read_text())["call_rule"]["budgets"]}
    for result in summary["selection"]["best"]["results"]:  # one line per budget: fraction, quality, λ, then the shipped rule
        fraction, quality, lam, threshold, its_fraction, its_quality = rows[f"{result['budget']:g}"]
        assert float(fraction) == round(result["teacher_fraction"], 3) and float(quality) == round(result["quality"], 2)
        assert float(lam) == round(summary["lambdas"][str(result["budget"])], 3)
        entry = shipped[result["budget"]]
        assert float(threshold) == float(f"{entry['threshold']:.3g}") and float(its_fraction) == round(entry["teacher_fraction"], 3)
        assert float(its_quality) == round(entry["quality"], 2)


def test_end_report_aligns_the_table_and_lists_the_files() -> None:
    text = end_report("title", [["b", "value"], ["0.1", "12.5"], ["0.25", "3"]], {"summary": "out/summary.json"},
                      notes=["a note"])
    assert text.splitlines() == ["title", "  b     value", "  0.1    12.5", "  0.25      3", "  a note", "files:",
                                 "  summary  out/summary.json"]


def _row(method: str, setting: str, fraction: float, quality: float, **fields) -> dict:
    return {"method": method, "setting": setting, "teacher_fraction": fraction, "quality": quality,
            "budget": None, "calibrated_for": None, "budget_cap": None, **fields}


def test_tw_eval_ends_with_one_line_per_budget() -> None:
    rows = [
        _row("student", "alone", 0.0, 6.2), _row("teacher", "alone", 1.0, 23.0),
        _row("training_wheels", "b=0.1", 0.07, 12.0, budget=0.1, budget_cap="off"),
        _row("training_wheels", "b=0.3", 0.31, 16.8, budget=0.3, budget_cap="off"),
        _row("training_wheels", "b=0.1 calibrated c=0.46", 0.1, 13.0, budget=0.1, calibrated_for=0.1, budget_cap="off"),
        _row("fallback", "t=0.02 (for 0.1)", 0.107, 8.8, calibrated_for=0.1),
        *(_row("distillspec", f"K=5 l={lenience}", 0.3, 15.0) for lenience in (0.1, 0.5)),
    ]
    lines = end_of_evaluation(rows, Path("out"), "40 test examples", "bleu").splitlines()
    assert lines[1].split() == ["b", "training_wheels", "training_wheels", "calibrated", "fallback", "calibrated"]
    assert lines[2].split() == ["0.1", "0.070", "/", "12.00", "0.100", "/", "13.00", "0.107", "/", "8.80"]
    assert lines[3].split() == ["0.3", "0.310", "/", "16.80", "-", "-"]
    assert lines[4].strip() == "student alone: 0.000 / 6.20; teacher alone: 1.000 / 23.00"
    assert "2 distillspec settings" in lines[5] and "results.csv" in lines[5]
    assert "out/results.json" in lines[-3] and len(lines) == 11


def test_tw_eval_puts_the_checkpoints_rule_under_the_methods_name_and_the_raw_rule_beside_it() -> None:
    raw = "raw π>½"
    rows = [
        _row("training_wheels", "b=0.1 (checkpoint c=0.512)", 0.093, 12.41, budget=0.1, budget_cap="off"),
        _row("training_wheels", f"b=0.1 {raw}", 0.119, 12.40, budget=0.1, budget_cap="off"),
        _row("training_wheels", "b=0.3", 0.31, 16.8, budget=0.3, budget_cap="off"),
    ]
    lines = end_of_evaluation(rows, Path("out"), "40 test examples", "bleu").splitlines()
    assert lines[1].split() == ["b", "training_wheels", "training_wheels", "raw", "π>½"]
    assert lines[2].split() == ["0.1", "0.093", "/", "12.41", "0.119", "/", "12.40"]
    assert lines[3].split() == ["0.3", "0.310", "/", "16.80", "-"]
