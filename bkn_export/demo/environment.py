"""What machine a measurement ran on, for the records the demo and the benchmarks write."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

__all__ = ["cpu_model_name"]


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's processor: a run is deterministic per seed on one
    machine, not across CPUs (their float kernels differ), and absolute times differ between machines, so results say
    which CPU made them."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
