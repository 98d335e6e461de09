"""The process settings every `tw` command applies (agents.run)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from agents.run import REUSE_FREED_MEMORY_ENV
from tests.tiny_task import only_family

# Allocates a 160 MB tensor, frees it, and prints whether the setting took effect and the resident memory after
# the free over the resident memory before it.
_PROBE = """
import os, torch
from agents.run import reuse_freed_memory
applied = reuse_freed_memory()
def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
block = torch.ones(40_000_000)
held = resident()
del block
print(applied, resident() / held)
"""


def _probe(opt_out: bool) -> tuple[bool, float]:
    env = {**os.environ, REUSE_FREED_MEMORY_ENV: "0" if opt_out else "1"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    applied, ratio = out.stdout.split()
    return applied == "True", float(ratio)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/statm"),
                    reason="glibc's mallopt and Linux's /proc")
def test_freed_large_tensors_stay_with_the_process_unless_opted_out():
    applied, kept = _probe(opt_out=False)
    assert applied and kept > 0.95  # the freed 160 MB are kept for the next large tensor
    applied, kept = _probe(opt_out=True)
    assert not applied and kept < 0.9  # glibc's default: the block was its own mmap, unmapped when freed


def _timing_free(value):
    """A summary without its wall-clock figures (seconds, tokens per second), which differ run to run."""
    if isinstance(value, dict):
        return {k: _timing_free(v) for k, v in value.items() if "seconds" not in k and not k.endswith("per_s")}
    if isinstance(value, list):
        return [_timing_free(v) for v in value]
    return value


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@only_family("encoder-decoder")
def test_a_reduced_run_is_bit_identical_with_freed_memory_reused_or_not(family, family_task, tmp_path):
    # Reused blocks hold old data where fresh pages held zeros: a tensor read before it is written (torch.empty)
    # would make the two runs differ. Both phases, selection and the tracked call rule, in two processes.
    import json

    from agents.config import config_to_json
    from agents.train import TrainConfig

    outputs = {}
    for reuse in ("1", "0"):
        out = tmp_path / f"run-{reuse}"
        config = TrainConfig(
            env_id="TrainingWheels-Synthetic-v0", env_kwargs=family_task.env_kwargs(), output_dir=str(out),
            max_new_tokens=5, bc_batches=3, bc_batch_size=6, pcl_batches=3, num_envs=6, replay_per_update=4,
            eval_every=3, eval_examples=8, checkpoint_every=10, threads=1, device="cpu",
            track_call_rule=True, call_rule_episodes=12,
        )
        (tmp_path / f"train-{reuse}.json").write_text(config_to_json(config))
        subprocess.run([sys.executable, "-m", "scripts.cli", "train", "--config", str(tmp_path / f"train-{reuse}.json")],
                       env={**os.environ, REUSE_FREED_MEMORY_ENV: reuse}, capture_output=True, text=True, check=True)
        weights = {f"{folder}/{p.name}": p.read_bytes() for folder in ("best", "final", "phase1")
                   for p in sorted((out / folder).resolve().glob("*.safetensors"))}
        outputs[reuse] = (weights, _timing_free(json.loads((out / "summary.json").read_text())))
    (reused, summary_reused), (fresh, summary_fresh) = outputs["1"], outputs["0"]
    assert reused and reused.keys() == fresh.keys()
    assert all(reused[name] == fresh[name] for name in reused), "weights differ between the two allocator modes"
    assert summary_reused == summary_fresh
