"""Wall-clock timing shared by the benchmark scripts (``fn`` must block until its work is done)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def seconds(fn: Callable[[], Any]) -> float:
    """Wall time of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Median wall time over ``repeats`` calls after one warm-up call, and every time."""
    fn()
    times = [seconds(fn) for _ in range(repeats)]
    return statistics.median(times), times


def cpu_model() -> str:
    """This machine's CPU model name (``/proc/cpuinfo``), "" where it cannot be read: every timing
    names the CPU that measured it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
