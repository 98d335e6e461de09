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
                 "--checkpoint-every", "1", "--call-rule-episodes", "12"]) == 0
    assert (tw / "best" / "training_wheels.safetensors").is_file() and (tw / "best" / "selection.json").is_file()
    assert (tw / "best" / "call_rule.json").is_file()  # the shipped rule: tracked during tw train
    assert "tracked" in json.loads((tw / "summary.json").read_text())["call_rule"]
    assert main(["gkd", "--config", str(CONFIGS / "deen-gkd.json"), *common, "--output-dir", str(gkd),
                 "--batches", "2", "--batch-size", "4", "--eval-every", "1", "--eval-examples", "2"]) == 0
    router = tmp_path / "co-llm"
    assert main(["co-llm", "--config", str(CONFIGS / "deen-co-llm.json"), *common, "--output-dir", str(router),
                 "--init-batches", "1", "--batches", "1", "--batch-size", "4", "--eval-examples", "2"]) == 0
    assert main(["eval", "--config", str(CONFIGS / "deen-eval.json"), *common, "--output-dir", str(ev),
                 "--tw-policy", str(tw / "best"), "--draft", str(gkd / "best"), "--co-llm-router", str(router / "best"),
                 "--examples", "2", "--calibration-examples", "2", "--latency-examples", "1", "--warmup", "0"]) == 0

    results = json.loads((ev / "results.json").read_text())
    rows = results["rows"]
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    assert set(by_method) == {"student", "teacher", "training_wheels", "distillspec", "fallback", "co_llm", "bild"}
    assert by_method["teacher"][0]["teacher_fraction"] == 1.0
    assert by_method["student"][0]["teacher_fraction"] == 0.0
    # Per budget of the shipped config: the checkpoint's own rule (the raw ½ rule beside it where they differ).
    tw_rows = by_method["training_wheels"]
    assert sorted({r["budget"] for r in tw_rows}) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert all(r.get("calibrated_for") is None for r in tw_rows) and results["tw_calibration"] is None
    # Every baseline is calibrated to each target fraction on the calibration rows.
    for method in ("fallback", "distillspec", "co_llm", "bild"):
        calibrated = [r for r in by_method[method] if r.get("calibrated_for") not in (None, "")]
        assert sorted(float(r["calibrated_for"]) for r in calibrated) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], method
