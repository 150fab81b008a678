"""Summaries of a bench's samples: n, median, one tail percentile, min and max.

The tail is the nearest-rank sample at index round(q·(n−1)), always one of the samples:
with 20 samples p99 is the maximum, the honest reading of a small run. (bench/lane_stats.py
keeps its own ceil-rank `percentile`, which tests/unit/test_bench_lanes.py pins.)
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def tail_sample(ordered: list[float], q: float) -> float:
    """The sample at rank round(q·(n−1)) of `ordered` (sorted, non-empty), q in [0, 1]."""
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spread(xs: Iterable[float], tail: float) -> dict[str, float]:
    """n, p50, the `tail` percentile (key "p95" for 0.95), min, max; `xs` must not be empty."""
    ordered = sorted(xs)
    return {
        "n": len(ordered),
        "p50": statistics.median(ordered),
        f"p{round(tail * 100)}": tail_sample(ordered, tail),
        "min": ordered[0],
        "max": ordered[-1],
    }


def spread_measured(xs: Iterable[float | None], tail: float) -> dict[str, float | None]:
    """`spread` over what was measured (None: not measured); all None when nothing was."""
    measured = [x for x in xs if x is not None]
    if not measured:
        return {"n": 0, "p50": None, f"p{round(tail * 100)}": None, "min": None, "max": None}
    return dict(spread(measured, tail))
