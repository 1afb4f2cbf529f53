"""Protects ``launch.keep_freed_memory`` (RunArgs.keep_freed_memory, applied by every run): freed blocks come
back from glibc's heap without page faults, up to 32 MB with "small" (the default outside CPU autocast) and at
any size with "all", where glibc's default unmaps each large block and faults its successor in afresh; and the
mode is a checked setting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from align_kit.configs import ConfigError, RunArgs

PROBE = """
import resource, sys, torch
from align_kit.training import launch
applied = launch.keep_freed_memory(sys.argv[1], cpu_autocast=sys.argv[3] == "autocast")
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(int(sys.argv[2]) // 4)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del block
print(applied, sum(faults[1:]))
"""
LARGE, SMALL = 64 * 2**20, 16 * 2**20  # bytes: above and below glibc's largest mmap threshold (32 MB)


def reallocation_pages(mode: str, size: int, autocast: bool = False) -> tuple[str, float]:
    """The mode applied and the page faults of the 7 allocations after the first (each of a block the size of
    the one just freed), in blocks' worth of 4 KB pages."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(size), "autocast" if autocast else "-"],
        capture_output=True,
        text=True,
        check=True,
    )
    applied, count = done.stdout.split()
    return applied, int(count) / (size // 4096)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_come_back_without_page_faults_as_the_mode_says():
    # a block can land beside the one just freed once or twice (the freed one is a little too small for an
    # aligned request); from then on the heap's top holds it
    assert reallocation_pages("auto", LARGE, autocast=True) == ("all", pytest.approx(0, abs=2.01))
    assert reallocation_pages("auto", SMALL) == ("small", pytest.approx(0, abs=2.01))
    applied, blocks = reallocation_pages("small", LARGE)
    assert applied == "small" and blocks >= 7
    applied, blocks = reallocation_pages("none", LARGE)
    assert applied == "none" and blocks >= 7


def test_an_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match="keep_freed_memory: 'heap' is not one of"):
        RunArgs(keep_freed_memory="heap")
