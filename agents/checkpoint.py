"""Atomic checkpoints: a run writes ``step-NNNNNN/`` folders and a ``latest`` pointer.

A checkpoint folder is written under a temporary name and renamed into place, and the pointer is
replaced atomically afterwards, so a run killed at any moment leaves the previous checkpoint
intact. Tensors go through safetensors; optimiser states through ``torch.save`` and are read back
with ``weights_only=True``; everything else (RNG states, λs, counters) is JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tw_env.atomic import write_json

LATEST = "latest"


def write_checkpoint(run_dir: Path, step: int, writer: Callable[[Path], None], keep: int = 2) -> Path:
    """Call ``writer(tmp_folder)`` to fill a new checkpoint, then publish it atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=run_dir))
    try:
        writer(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer_tmp = run_dir / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, run_dir / LATEST)
    _prune(run_dir, keep, protect=final.name)
    return final


def _prune(run_dir: Path, keep: int, protect: str) -> None:
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    return path if path.exists() else None


def save_json(path: Path, data: Any) -> None:
    write_json(path, data, indent=1, sort_keys=True)


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def rng_state(generator: np.random.Generator) -> dict[str, Any]:
    """Every random state a run depends on, as JSON-able data (torch's as a list of bytes)."""
    return {
        "python": _jsonable(random.getstate()),
        "numpy_global": _jsonable(np.random.get_state()),
        "generator": generator.bit_generator.state,
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any], generator: np.random.Generator) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy_global"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    generator.bit_generator.state = state["generator"]
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    torch.save(optimizer.state_dict(), path)


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    optimizer.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
