"""Figures from samples, timing, and progress lines: shared by the benchmark's parts."""

from __future__ import annotations

import statistics
import sys
import time


def summary(samples: list[float], scale: float = 1000.0) -> dict[str, float]:
    """median, p95, p99, min, max of `samples` (seconds), in ms by default."""
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))] * scale

    return {
        "n": len(ordered),
        "median": statistics.median(ordered) * scale,
        "p95": pct(0.95),
        "p99": pct(0.99),
        "min": ordered[0] * scale,
        "max": ordered[-1] * scale,
    }


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
