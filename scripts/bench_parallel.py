"""Speed benchmark of data-parallel training: phase-2 (PCL) and GKD throughput with 1 process × T
threads against N processes × T/N threads, on the same cores (docs/benchmarks.md).

Each variant is a real ``tw train --phase pcl`` / ``tw gkd`` run, the N-process ones under
``python -m torch.distributed.run``; the variants alternate ``repeats`` times so that drift in a
shared machine's load hits both alike. Throughput is the run's own count: output tokens of every
rank per second of training steps (rollout or sampling plus updates; evaluation and checkpoints
excluded), read from its ``summary.json``.

    tw bench-parallel --init runs/synthetic/phase1 --output /tmp/bench-parallel.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.config import config_to_json
from agents.gkd import GKDConfig
from agents.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BenchParallelConfig:
    """Phase-2 and GKD tokens/s: 1 process × ``threads`` against ``processes`` × (threads / processes)."""

    env_id: str = "TrainingWheels-Synthetic-v0"  # registered task
    env_kwargs: dict = field(default_factory=dict)  # overrides for gym.make (teacher, student, data, ...)
    init: str = "runs/synthetic/phase1"  # phase-1 policy phase 2 starts from (tw train's phase1/ folder)
    train_config: str = "configs/synthetic.json"  # phase-2 settings (num_envs, updates, ...) taken from this file
    gkd_config: str = "configs/synthetic-gkd.json"  # GKD settings taken from this file
    processes: int = 2  # data-parallel processes of the parallel variant
    threads: int = 2  # torch threads in all: 1 process × threads against processes × threads/processes
    pcl_batches: int = 12  # PCL batches per timed run
    gkd_batches: int = 20  # GKD batches per timed run
    repeats: int = 2  # timed runs per variant, alternating
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (NCCL: one GPU per process)
    output: str | None = None  # optional JSON file for the results

    def validate(self) -> None:
        if self.processes < 2 or self.threads < self.processes or self.threads % self.processes:
            raise ValueError(f"need processes >= 2 and threads a multiple of processes, got {self.processes} "
                             f"and {self.threads}")
        if min(self.pcl_batches, self.gkd_batches, self.repeats) < 1:
            raise ValueError("pcl_batches, gkd_batches and repeats must be >= 1")
        if not Path(self.init).exists():
            raise FileNotFoundError(f"no phase-1 policy at '{self.init}': run tw train --phase bc first, or pass --init")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timed_run(command: str, config: Any, processes: int, threads: int, folder: Path) -> dict[str, Any]:
    path = folder / f"{command}.json"
    path.write_text(config_to_json(config))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                 "--master-port", str(_free_port())] if processes > 1 else [sys.executable])
    subprocess.run([*launcher, "-m", "scripts.cli", command, "--config", str(path)], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    return summary["phase2"] if command == "train" else summary


def run(config: BenchParallelConfig) -> dict[str, Any]:
    config.validate()
    train_base = json.loads(Path(config.train_config).read_text())
    gkd_base = json.loads(Path(config.gkd_config).read_text())
    variants = [(1, config.threads), (config.processes, config.threads // config.processes)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tw-bench-parallel-") as tmp:
        for repeat in range(config.repeats):
            for processes, threads in variants:
                out = Path(tmp) / f"r{repeat}-p{processes}"
                out.mkdir()
                train = TrainConfig(**{**train_base, "env_id": config.env_id, "env_kwargs": config.env_kwargs,
                                       "output_dir": str(out / "train"), "phase": "pcl", "init": config.init,
                                       "pcl_batches": config.pcl_batches, "eval_every": 0, "settle_evaluations": 0, "eval_examples": 64,
                                       "checkpoint_every": 10**9, "threads": threads, "device": config.device})
                pcl = _timed_run("train", train, processes, threads, out)
                gkd = GKDConfig(**{**gkd_base, "env_id": config.env_id, "env_kwargs": config.env_kwargs,
                                   "output_dir": str(out / "gkd"), "batches": config.gkd_batches, "eval_every": 0,
                                   "eval_examples": 64, "checkpoint_every": 10**9, "threads": threads,
                                   "device": config.device})
                distil = _timed_run("gkd", gkd, processes, threads, out)
                row = {"repeat": repeat, "processes": processes, "threads_per_process": threads,
                       "pcl_tokens_per_s": pcl["on_policy_tokens_per_s"], "pcl_seconds": pcl["training_seconds"],
                       "gkd_tokens_per_s": distil["trajectory_tokens_per_s"], "gkd_seconds": distil["training_seconds"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result: dict[str, Any] = {"config": dataclasses.asdict(config), "runs": rows}
    for what in ("pcl", "gkd"):
        ratios = [p[f"{what}_tokens_per_s"] / s[f"{what}_tokens_per_s"] for s, p in zip(rows[::2], rows[1::2], strict=True)]
        result[f"{what}_parallel_over_single"] = ratios
    print(f"{config.processes} processes ÷ 1 process, tokens/s: phase 2 "
          + " / ".join(f"{r:.2f}" for r in result["pcl_parallel_over_single"]) + "; GKD "
          + " / ".join(f"{r:.2f}" for r in result["gkd_parallel_over_single"]))
    if config.output:
        Path(config.output).write_text(json.dumps(result, indent=1))
    return result
