#!/usr/bin/env bash
# A reduced main job on both embedded tasks (T5 and causal): phases 1-2 (a few dozen batches, fixed
# seed), GKD, and `tw eval` with every method and a calibrated Training Wheels row, written under
# OUT (default runs/reduced). It evaluates on training rows and calibrates on validation rows: a
# regression check never scores a test split (docs/test-split-log.md). Its results, wall times
# aside, are what a refactoring must leave bit-identical: run it on both commits, each in its own
# checkout with the same relative OUT (results record paths), then compare the two folders.
#
#   (cd ../before && scripts/reduced_main_job.sh runs/reduced)   # the old commit, in a worktree
#   scripts/reduced_main_job.sh runs/reduced                      # the new one
#   python scripts/compare_runs.py ../before/runs/reduced runs/reduced
#
# About 2 minutes on 2 CPU cores once the embedded models are cached (docs/architecture.md).
set -euo pipefail
OUT=${1:-runs/reduced}
PY=${PYTHON:-python}
for task in synthetic synthetic-causal; do
  case $task in
    synthetic) env_id=TrainingWheels-Synthetic-v0 ;;
    synthetic-causal) env_id=TrainingWheels-SyntheticCausal-v0 ;;
  esac
  "$PY" -m scripts.cli train --config "configs/$task.json" --output-dir "$OUT/$task" --threads 1 \
    --bc-batches 20 --pcl-batches 12 --num-envs 16 --replay-per-update 16 --eval-every 6 --eval-examples 48 \
    --checkpoint-every 6 --keep-evaluated-policies true
  "$PY" -m scripts.cli gkd --config "configs/$task-gkd.json" --output-dir "$OUT/$task-gkd" --threads 1 \
    --batches 8 --batch-size 16 --eval-every 4 --eval-examples 32
  "$PY" -m scripts.cli eval --env-id "$env_id" --output-dir "$OUT/$task/eval" --threads 1 --split train --examples 40 \
    --batch-size 16 --latency-examples 2 --warmup 1 --tw-policy "$OUT/$task/best" --draft "$OUT/$task-gkd/best" \
    --methods '["student", "teacher", "training_wheels", "distillspec", "fallback", "kl_oracle"]' \
    --lenience '[0.0, 0.5, 1.0]' --draft-lengths '[3]' --thresholds '[0.5, 0.9]' --fallback-targets '[0.2]' \
    --tw-calibrate true --tw-policy-candidates "[\"$OUT/$task/phase2-evaluated/step-*\"]" \
    --calibration-examples 32 --budgets '[0.0, 0.2, 0.5]'
done
