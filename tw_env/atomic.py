"""Atomic writes: one way to publish a folder, one way to write a file, for every command.

The guarantee: a reader of ``target`` always finds either the complete old content or the complete
new content, never a partial one and never nothing, whenever the writing process is killed.

- A file is written beside its target and moved over it with ``os.replace`` (atomic on POSIX).
- A folder cannot be swapped that way (``rename`` refuses a non-empty destination, and
  delete-then-rename leaves a moment with nothing at the path). So a published folder lives in a
  hidden, versioned sibling (``.best.v-a1b2c3``) and ``target`` is a relative symlink to it; the
  symlink is swapped with ``os.replace``, which is atomic, and the old version is removed after.
  Readers (``from_pretrained``, ``StudentPolicy.load``, ``ls``) follow the link transparently, and
  copying the whole run folder keeps it valid.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary sibling, flushed, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any, indent: int = 2, sort_keys: bool = False) -> None:
    """``json.dumps(data)`` written atomically; the format every command uses for its JSON files."""
    write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def _version_prefix(target: Path) -> str:
    return f".{target.name}.v-"


def publish_dir(target: str | Path, build: Callable[[Path], None]) -> Path:
    """Fill a new folder with ``build(folder)`` and publish it at ``target`` atomically.

    If ``build`` raises, nothing changes at ``target``. Returns ``target``. A ``target`` that is a
    plain folder (written before this scheme) is first moved into a version of its own; that one
    move is the only step at which a kill leaves no folder at the path, and it happens once.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    version = Path(tempfile.mkdtemp(prefix=_version_prefix(target), dir=parent))
    try:
        build(version)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    if target.exists() and not target.is_symlink():
        legacy = Path(tempfile.mkdtemp(prefix=_version_prefix(target), dir=parent))
        legacy.rmdir()
        os.replace(target, legacy)
    link = parent / f".{target.name}.link-{os.getpid()}"
    link.unlink(missing_ok=True)
    os.symlink(version.name, link)
    os.replace(link, target)  # the atomic step: target now names the new version
    _fsync_dir(parent)
    _remove_stale_versions(target, keep=version.name)
    return target


def _remove_stale_versions(target: Path, keep: str) -> None:
    # Every version but the one published: the previous one, and any left by a killed writer.
    for path in target.parent.glob(_version_prefix(target) + "*"):
        if path.name != keep and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
