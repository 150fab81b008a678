"""Polling a condition until a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], what: str, timeout: float, interval: float = 0.2) -> None:
    """Return once `predicate()` is true; fail with "never saw `what`" after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(interval)
