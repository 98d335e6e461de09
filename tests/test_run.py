"""The process settings every `tw` command applies (agents.run)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from agents.run import REUSE_FREED_MEMORY_ENV

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
