"""Samples to figures: median, p95 and n; explicit skips; ratios sandlot / alternative.

A figure's "p95" is its tail: for lower-is-better figures (latencies, memory) the 95th
percentile; for higher-is-better ones (throughputs) the 5th percentile, i.e. the value 95 % of
samples are at least as good as. That keeps "p95" meaning "the bad end" everywhere.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

Result = dict[str, Any]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(samples: list[float], *, higher_is_better: bool = False, **extra: Any) -> Result:
    if not samples:
        raise ValueError("no samples")
    tail = percentile(samples, 5 if higher_is_better else 95)
    out: Result = {
        "median": round(statistics.median(samples), 4),
        "p95": round(tail, 4),
        "n": len(samples),
        "min": round(min(samples), 4),
        "max": round(max(samples), 4),
    }
    out.update(extra)
    return out


def skipped(reason: str) -> Result:
    return {"skipped": reason}


def is_skip(result: Result | None) -> bool:
    return result is None or "skipped" in result


def ratio(sandlot: Result | None, other: Result | None) -> float | None:
    """sandlot median / alternative median (both measured, both non-zero), else None."""
    if is_skip(sandlot) or is_skip(other):
        return None
    assert sandlot is not None and other is not None
    if not other["median"]:
        return None
    return round(float(sandlot["median"]) / float(other["median"]), 3)


class Stopwatch:
    """``with sw.lap(): ...`` records elapsed milliseconds into ``sw.samples``."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    @contextmanager
    def lap(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.samples.append((time.perf_counter() - t0) * 1000.0)


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
