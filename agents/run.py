"""The scaffold every command shares: validate the config, set threads and device, make the output
folder, write ``config.json``, load the task (and its selection split), write ``summary.json``.

``tw train``, ``tw train --algo ppo``, ``tw gkd``, ``tw eval`` and both benchmarks start with
:func:`start_run`; the trainers load their data with :func:`load_tasks`. Files are written
atomically (:mod:`tw_env.atomic`) and in one format.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel

from agents.config import config_to_json
from agents.distributed import SINGLE, Distributed, from_environment
from tw_env.atomic import write_json, write_text
from tw_env.models import resolve_device
from tw_env.registration import make_task, split_env_options
from tw_env.task import Task
from tw_env.tasks import env_data_source


class CommandConfig(Protocol):
    """What :func:`start_run` reads of a command's config (every ``*Config`` dataclass has it)."""

    device: str
    threads: int

    def validate(self) -> None: ...


@dataclass(frozen=True)
class Run:
    """A started command: its config, device, output folder (``None`` for commands that write none) and
    its place in a data-parallel job (:mod:`agents.distributed`; one process unless a launcher started N)."""

    config: Any
    device: torch.device
    out: Path | None
    dist: Distributed = SINGLE

    def write_summary(self, summary: dict[str, Any]) -> None:
        """``summary.json``, atomically (rank 0 only)."""
        if self.out is not None and self.dist.is_main:
            write_json(self.out / "summary.json", summary)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
REUSE_FREED_MEMORY_ENV = "TW_REUSE_FREED_MEMORY"


def reuse_freed_memory() -> bool:
    """Let this process reuse the memory of freed large tensors instead of returning it to the OS at once.

    Why: glibc's malloc serves every block over 32 MB with its own ``mmap`` and unmaps it when freed, so
    each new ``[N, V]`` temporary of a de→en batch (80 MB at N = 2,560, V = 8,000) is fresh pages that the
    kernel zeroes on first touch. On this project's CPU that made a copy or an ``exp`` of such a tensor
    take 36–52 ms instead of 6–19 ms (docs/benchmarks.md). With ``mmap`` off for malloc (``M_MMAP_MAX`` 0)
    and the heap's free top kept up to 2 GB (``M_TRIM_THRESHOLD``), freed blocks are reused. The arithmetic
    is unchanged, so results are bit-identical; the price is that the process keeps its peak memory.

    ``tw`` applies it to each command; a Python program may call it first thing. A no-op (False) off glibc,
    or where the environment variable ``TW_REUSE_FREED_MEMORY`` is ``0``; True where it took effect.
    """
    if os.environ.get(REUSE_FREED_MEMORY_ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def start_run(config: CommandConfig, output_dir: str | Path | None, data_parallel: bool = False) -> Run:
    """Validate ``config``, apply its threads and device, create ``output_dir`` with ``config.json``.

    ``data_parallel`` commands (``tw train``, ``tw gkd``) join the process group a launcher
    describes (:func:`agents.distributed.from_environment`); the others always run as one process.
    """
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    info = SINGLE
    if data_parallel:
        info, device = from_environment(device)
    out = None
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if info.is_main:
            write_text(out / "config.json", config_to_json(config))
    return Run(config, device, out, info)


def check_selection_data(
    env_kwargs: dict[str, Any], selection_split: str, selection_kwargs: dict[str, Any], allow: bool = False
) -> None:
    """Refuse (or, with ``allow``, loudly accept) checkpoint selection on the training examples.

    The two sources are compared before anything is loaded: a local file has no splits, so a run
    whose training and selection data are one file would select on what it trained on.
    """
    train_source = env_data_source(env_kwargs)
    selection_source = env_data_source({**env_kwargs, "split": selection_split, **selection_kwargs})
    if train_source != selection_source:
        return
    problem = (
        f"checkpoint selection would run on the training examples: training and selection (split "
        f"'{selection_split}') both read {train_source}"
    )
    if not allow:
        raise ValueError(
            f"{problem}. Expected selection data apart from the training data: pass a folder with "
            "train.jsonl and validation.jsonl as env_kwargs 'data' (each split reads its own file), or "
            'the selection file as eval_env_kwargs: {"data": "validation.jsonl"}; set '
            "allow_selection_on_training_data to select on the training examples anyway."
        )
    print(f"WARNING: {problem}; selected checkpoints are scored on examples they were trained on "
          "(allow_selection_on_training_data is set).", file=sys.stderr, flush=True)


def check_calibration_data(env_kwargs: dict[str, Any], split: str, calibration_split: str) -> None:
    """Refuse calibrating `tw eval`'s thresholds on the evaluated examples.

    The two splits are compared by the data they resolve to (:func:`~tw_env.tasks.env_data_source`),
    before anything is loaded: a local file has no splits, so two split names may read one file (and
    a folder's split files may be one file under two names).
    """
    evaluated = env_data_source({**env_kwargs, "split": split})
    if env_data_source({**env_kwargs, "split": calibration_split}) != evaluated:
        return
    raise ValueError(
        f"calibration_split {calibration_split!r} reads the same data as the evaluated split {split!r} "
        f"({evaluated}); calibrate on other data (e.g. validation.jsonl beside test.jsonl in a folder passed "
        "as env_kwargs 'data') so that the results stay held out"
    )


@dataclass(frozen=True)
class Tasks:
    """The training task, the selection task (same loaded teacher) and the env's own options."""

    train: Task
    selection: Task
    env_options: dict[str, Any]


def load_tasks(
    env_id: str, env_kwargs: dict[str, Any], selection_split: str, selection_kwargs: dict[str, Any],
    device: torch.device, **task_overrides: Any,
) -> Tasks:
    """Load a registered task for training and, sharing its loaded teacher, its selection split.

    ``env_kwargs`` are ``gym.make`` keywords (task fields and env options alike);
    ``selection_kwargs`` override them for the selection split (e.g. its data file);
    ``task_overrides`` (budgets, max_new_tokens) apply to both.
    """
    env_options, task_kwargs = split_env_options(dict(env_kwargs))
    task_kwargs.setdefault("device", str(device))
    task_kwargs.update({k: v for k, v in task_overrides.items() if v is not None})
    train = make_task(env_id, **task_kwargs)
    _, selection_overrides = split_env_options(dict(selection_kwargs))
    # The selection split shares the loaded teacher and tokenizer: nothing is loaded twice.
    shared = {"teacher": train.teacher, "tokenizer": train.tokenizer}
    selection = make_task(env_id, **{**task_kwargs, **shared, "split": selection_split, **selection_overrides})
    return Tasks(train, selection, env_options)


def student_source(student: str | None, task: Task) -> str | PreTrainedModel:
    """The student a trainer starts from: ``student`` (``--student``, a hub id or directory), else the task's
    (a name or a loaded model)."""
    source = student or task.student
    if source is None:
        raise ValueError("no student model: pass --student (a hub id or a directory) or a task with a default student")
    return str(source) if not isinstance(source, torch.nn.Module) else source


def phase1_policy_dir(init: str | None, output_dir: Path, what: str) -> Path:
    """The phase-1 policy ``what`` starts from: ``init``, else ``OUTPUT_DIR/phase1``; it must exist."""
    policy_dir = Path(init) if init else output_dir / "phase1"
    if not policy_dir.exists():
        raise FileNotFoundError(
            f"{what} starts from a phase-1 policy, but '{policy_dir}' does not exist; run phase 1 first "
            "(tw train --phase bc or both) or pass --init RUN_DIR/phase1"
        )
    return policy_dir


class Throughput:
    """Tokens and seconds of the training steps alone (no evaluation, no checkpoint), all ranks' tokens."""

    def __init__(self) -> None:
        self.tokens, self.seconds = 0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += int(tokens)
        self.seconds += seconds

    def summary(self, what: str) -> dict[str, float]:
        return {f"{what}_tokens": self.tokens, "training_seconds": self.seconds,
                f"{what}_tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0}


def end_report(
    title: str, table: Sequence[Sequence[str]], files: Mapping[str, str | Path], notes: Sequence[str] = ()
) -> str:
    """What a command prints as it ends: a title, an aligned table (header row first; the first column
    left-aligned, the others right-aligned), note lines, and where its files are. Everything else is in
    the files."""
    lines = [title]
    if table:
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines += ["  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                   for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
                  for row in table]
    lines += [f"  {note}" for note in notes]
    if files:
        width = max(len(name) for name in files)
        lines += ["files:", *(f"  {name.ljust(width)}  {path}" for name, path in files.items())]
    return "\n".join(lines)
