"""Compare two run folders bit for bit, wall times aside (what a refactoring must leave unchanged).

    python scripts/compare_runs.py runs/reduced-before runs/reduced-after

Every ``summary.json``, ``selection.json``, ``results.json`` and ``outputs.jsonl`` must hold the same
values (floats compared exactly) except for keys that measure time or speed; every ``*.safetensors``
file (the saved policies, value nets and drafts) must hold identical tensors. Prints each difference
and exits 1 if there is any, 0 (with the count of files compared) otherwise.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

# Keys whose values are measurements of this machine's speed, not results of the computation.
TIMING_KEY = re.compile(r"(seconds|_s$|_ms|ms_|per_s|latency|wall|time|device$|threads)")
COMPARED_JSON = ("summary.json", "selection.json", "results.json", "done.json")


def strip_timings(value: object) -> object:
    if isinstance(value, dict):
        return {k: strip_timings(v) for k, v in value.items() if not TIMING_KEY.search(str(k))}
    if isinstance(value, list):
        return [strip_timings(v) for v in value]
    return value


def differences(a: object, b: object, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in {'first' if k in a else 'second'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")]
    if a != b and not (a != a and b != b):  # NaN equals NaN here
        return [f"{where}: {a!r} != {b!r}"]
    return []


def relative_files(root: Path) -> set[str]:
    """The compared files under ``root``, through the links that publish policies (``best`` ->
    ``.best.v-…``); the hidden version folders themselves are skipped (their names are random)."""
    names = {*COMPARED_JSON, "outputs.jsonl"}
    found = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name in names or name.endswith(".safetensors"):
                found.add(str((Path(folder) / name).relative_to(root)))
    return found


def compare_file(first: Path, second: Path, name: str) -> list[str]:
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file

        x, y = load_file(str(first)), load_file(str(second))
        if set(x) != set(y):
            return [f"{name}: tensor names differ"]
        return [f"{name}:{k}: tensors differ" for k in sorted(x) if not (x[k].shape == y[k].shape and x[k].equal(y[k]))]
    if name.endswith(".jsonl"):
        a = [json.loads(line) for line in first.read_text().splitlines()]
        b = [json.loads(line) for line in second.read_text().splitlines()]
    else:
        a, b = json.loads(first.read_text()), json.loads(second.read_text())
    return differences(strip_timings(a), strip_timings(b), name)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    first, second = Path(argv[0]), Path(argv[1])
    names_a, names_b = relative_files(first), relative_files(second)
    problems = [f"{n}: only in {first if n in names_a else second}" for n in sorted(names_a ^ names_b)]
    for name in sorted(names_a & names_b):
        problems += compare_file(first / name, second / name, name)
    for line in problems:
        print(line)
    print(f"{len(names_a & names_b)} files compared, {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
