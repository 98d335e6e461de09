"""The real-text pipeline of docs/results-deen.md, end to end at a tiny size (slow: about a minute).

`tw train-mt` trains a tokenizer, teacher and student on a few German/English pairs; then the
shipped configs `configs/deen.json`, `deen-gkd.json` and `deen-eval.json` run on them (`tw train`,
`tw gkd`, `tw eval`) with only the sizes and paths overridden, so a config that stops matching the
commands fails here rather than in a user's 90-minute run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_train_translation import tiny_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.slow
def test_train_mt_then_the_deen_configs_run_end_to_end(tmp_path):
    from scripts import train_translation as mt
    from scripts.cli import main

    mt.run(tiny_config(tmp_path, "models"))
    models = tmp_path / "models"
    shipped = json.loads((CONFIGS / "deen.json").read_text())["env_kwargs"]
    env_kwargs = {**shipped, "teacher": str(models / "teacher"), "student": str(models / "student"),
                  "tokenizer": str(models / "tokenizer"), "data": str(models / "data"), "max_new_tokens": 4}
    common = ["--env-kwargs", json.dumps(env_kwargs), "--threads", "1"]
    tw, gkd, ev = tmp_path / "tw", tmp_path / "gkd", tmp_path / "eval"

    assert main(["train", "--config", str(CONFIGS / "deen.json"), *common, "--output-dir", str(tw),
                 "--bc-batches", "2", "--bc-batch-size", "4", "--pcl-batches", "2", "--num-envs", "6",
                 "--replay-per-update", "4", "--eval-every", "1", "--eval-examples", "2",
                 "--checkpoint-every", "1"]) == 0
    assert (tw / "best" / "training_wheels.safetensors").is_file() and (tw / "best" / "selection.json").is_file()
    assert main(["gkd", "--config", str(CONFIGS / "deen-gkd.json"), *common, "--output-dir", str(gkd),
                 "--batches", "2", "--batch-size", "4", "--eval-every", "1", "--eval-examples", "2"]) == 0
    assert main(["eval", "--config", str(CONFIGS / "deen-eval.json"), *common, "--output-dir", str(ev),
                 "--tw-policy", str(tw / "best"), "--draft", str(gkd / "best"), "--examples", "2",
                 "--calibration-examples", "2", "--latency-examples", "1", "--warmup", "0",
                 "--tw-policy-candidates", json.dumps([str(tw / "phase2-evaluated" / "step-*")])]) == 0

    results = json.loads((ev / "results.json").read_text())
    rows = results["rows"]
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    assert set(by_method) == {"student", "teacher", "training_wheels", "distillspec", "fallback"}
    assert by_method["teacher"][0]["teacher_fraction"] == 1.0
    assert by_method["student"][0]["teacher_fraction"] == 0.0
    # One row per budget of the shipped config under the policy's own rule, one with its calibrated call threshold.
    tw_rows = by_method["training_wheels"]
    assert [r["budget"] for r in tw_rows if r.get("calibrated_for") is None] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert [r["calibrated_for"] for r in tw_rows if r.get("calibrated_for") is not None] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    report = results["tw_calibration"]
    # The shipped recipe keeps every evaluated policy (batches 0, 1, 2 here); the pattern finds them in order.
    assert [c["policy"] for c in report["candidates"]] == [
        str(tw / "best"), *(str(tw / "phase2-evaluated" / f"step-{s:06d}") for s in (0, 1, 2))]
    assert report["chosen"] in [c["policy"] for c in report["candidates"]]
    # best/ is one of the kept policies under another name: that one reuses best's calibration.
    reused = [c for c in report["candidates"] if "same_weights_as" in c]
    assert [c["same_weights_as"] for c in reused] == [str(tw / "best")]
    assert reused[0]["budgets"] == report["candidates"][0]["budgets"]
    calibrated = [r for r in by_method["fallback"] if r.get("calibrated_for") not in (None, "")]
    assert sorted(float(r["calibrated_for"]) for r in calibrated) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
