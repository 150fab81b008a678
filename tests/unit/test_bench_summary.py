"""bench/summary.py: the n / p50 / tail / min / max summary the benches report."""

from __future__ import annotations

from bench.summary import spread, spread_measured, tail_sample


def test_spread_names_the_tail_and_reads_it_by_nearest_rank() -> None:
    xs = [float(x) for x in range(20, 0, -1)]  # 20 samples, unsorted
    assert spread(xs, tail=0.95) == {"n": 20, "p50": 10.5, "p95": 19.0, "min": 1.0, "max": 20.0}
    # With 20 samples p99 is the maximum: round(0.99 * 19) is the last index.
    assert spread(xs, tail=0.99)["p99"] == 20.0


def test_tail_sample_is_always_one_of_the_samples() -> None:
    assert tail_sample([1.0], 0.95) == 1.0
    assert tail_sample([1.0, 2.0, 3.0], 0.5) == 2.0
    assert tail_sample([1.0, 2.0, 3.0, 4.0], 0.95) == 4.0


def test_spread_measured_leaves_out_what_was_not_measured() -> None:
    assert spread_measured([3.0, None, 1.0, 2.0], tail=0.95) == {
        "n": 3,
        "p50": 2.0,
        "p95": 3.0,
        "min": 1.0,
        "max": 3.0,
    }
    assert spread_measured([None, None], tail=0.99) == {
        "n": 0,
        "p50": None,
        "p99": None,
        "min": None,
        "max": None,
    }
