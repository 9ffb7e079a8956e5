"""The per-stage memory trace attributes an allocation to the stage that made it."""

from __future__ import annotations

import sys

import pytest
import torch

from cap_dist.engines.distributed.memory import StageMemory, current_rss_mb, peak_rss_mb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm (Linux)")


def test_stage_peaks_name_the_stage_that_allocated() -> None:
    memory = StageMemory(interval=0.001)
    try:
        with memory.stage("small"):
            small = torch.ones(2**20)                         # 4 MiB
        with memory.stage("large"):
            large = torch.ones(64 * 2**20)                    # 256 MiB, touched
            del large
        del small
    finally:
        memory.close()
    assert memory.peaks["large"] - memory.baseline_mb > 200
    assert memory.peaks["small"] < memory.peaks["large"] - 200
    assert peak_rss_mb() >= memory.peaks["large"] - 1 and current_rss_mb() > 0


CHURN = r"""
import sys, torch
from cap_dist.engines.distributed.memory import current_rss_mb, map_large_blocks
if sys.argv[1] == "mapped":
    assert map_large_blocks()
before = current_rss_mb()
for _ in range(3):                      # free-then-allocate churn of 8 MiB blocks, as calibration makes
    blocks = [torch.ones(2 * 2**20) for _ in range(40)]
    del blocks[::2]
    blocks += [torch.ones(2 * 2**20 + 1024) for _ in range(10)]
    del blocks
print(current_rss_mb() - before)
"""


@pytest.mark.skipif(__import__("cap_dist.engines.distributed.memory", fromlist=["_glibc"])._glibc() is None,
                    reason="needs glibc's mallopt")
def test_mapped_large_blocks_go_back_to_the_kernel_when_freed() -> None:
    import subprocess

    kept = float(subprocess.run([sys.executable, "-c", CHURN, "mapped"], capture_output=True, text=True,
                                check=True).stdout)
    assert kept < 40, f"{kept:.0f} MiB of freed 8 MiB blocks stayed resident"
