"""`tw_env.atomic`: a published folder is always the complete old one or the complete new one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tw_env import atomic
from tw_env.atomic import publish_dir, write_json, write_text

FILES = ("a.txt", "b.txt", "c.txt")


def fill(version: str):
    def build(folder: Path) -> None:
        for name in FILES:
            (folder / name).write_text(version)

    return build


def content(target: Path) -> str:
    """The version a reader finds at ``target``; fails if the folder is missing or mixed."""
    versions = {(target / name).read_text() for name in FILES}
    assert len(versions) == 1, versions
    return versions.pop()


def test_publish_replaces_and_leaves_one_version(tmp_path):
    target = tmp_path / "best"
    publish_dir(target, fill("1"))
    publish_dir(target, fill("2"))
    assert content(target) == "2"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "best") == [target.resolve().name]


def test_a_failing_build_changes_nothing(tmp_path):
    target = tmp_path / "best"
    publish_dir(target, fill("1"))

    def broken(folder: Path) -> None:
        (folder / "a.txt").write_text("2")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_dir(target, broken)
    assert content(target) == "1"
    assert len(list(tmp_path.iterdir())) == 2  # the link and its version: the failed build is gone


@pytest.mark.parametrize("step", ["symlink", "replace", "fsync", "cleanup"])
def test_interrupted_at_every_step_leaves_a_complete_folder(tmp_path, monkeypatch, step):
    """A crash at any step after the build: the old or the new version is at the path, complete."""
    target = tmp_path / "best"
    publish_dir(target, fill("old"))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt(step)

    where = {"symlink": (os, "symlink"), "replace": (os, "replace"), "fsync": (atomic, "_fsync_dir"),
             "cleanup": (atomic, "_remove_stale_versions")}[step]
    monkeypatch.setattr(*where, crash)
    with pytest.raises(KeyboardInterrupt):
        publish_dir(target, fill("new"))
    monkeypatch.undo()
    assert content(target) == ("new" if step in ("fsync", "cleanup") else "old")
    publish_dir(target, fill("next"))  # the next publish cleans up whatever the crash left
    assert content(target) == "next"
    assert len(list(tmp_path.glob(".best.v-*"))) == 1


def test_a_folder_written_before_links_is_migrated(tmp_path):
    target = tmp_path / "best"
    target.mkdir()
    fill("plain")(target)
    publish_dir(target, fill("linked"))
    assert target.is_symlink() and content(target) == "linked"


PUBLISH_FOREVER = """
import importlib.util, sys
from pathlib import Path
# The module alone, not the package: `import tw_env` loads torch, which would dominate each run.
spec = importlib.util.spec_from_file_location("atomic", sys.argv[3])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
publish_dir = atomic.publish_dir
target, i = Path(sys.argv[1]), int(sys.argv[2])
def build(folder, files=("a.txt", "b.txt", "c.txt")):
    for name in files:
        (folder / name).write_text(f"{i}," * 20000)
while True:
    i += 1
    publish_dir(target, build)
"""


def test_sigkill_at_random_moments_never_leaves_a_partial_folder(tmp_path):
    """A real kill -9 of a process that publishes in a loop, twenty times at different moments."""
    target = tmp_path / "best"
    root = Path(__file__).resolve().parents[1]
    seen = set()
    for attempt in range(20):
        before = os.readlink(target) if target.is_symlink() else None
        proc = subprocess.Popen([sys.executable, "-c", PUBLISH_FOREVER, str(target), str(1000 * attempt), atomic.__file__],
                                cwd=root)
        deadline = time.time() + 60
        while (not target.is_symlink() or os.readlink(target) == before) and time.time() < deadline:
            time.sleep(0.002)  # until this process has published once
        time.sleep(0.003 * (attempt % 7))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen.add(content(target))  # complete and of one version, whatever the moment of the kill
    assert len(seen) > 1  # the kills landed at different points of the publishing loop


def test_write_text_and_json_replace_atomically(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    write_json(path, {"a": 1})
    write_text(path.with_name("config.json"), "{}\n")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json", "summary.json"]
