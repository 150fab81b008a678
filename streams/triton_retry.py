"""Calling Triton from a lane: retry with backoff to a deadline, and the lane gate.

Each lane retries a failed Triton call (0.5, 1, 2, then every 4 s) up to a deadline of
three times `triton.timeout_s`; a request that still fails then is the caller's dead
letter. While any more urgent lane has a request retrying, a lane holds back
(`LaneRetryGate`): Triton's priority levels only order requests that queue together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from processors.triton_client import Inference, InferenceError, TritonModelClient
from radtriage import metrics
from radtriage.telemetry import trace_carrier
from schemas.requests import TriageRequest

log = logging.getLogger(__name__)
tracer = trace.get_tracer("radtriage.streams")

# Backoff between Triton attempts; the last value repeats until the deadline.
RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)


class LaneRetryGate:
    """Keeps a lane off Triton while a more urgent lane has requests retrying.

    Each lane retries on its own backoff, so when Triton comes back after an outage the
    first backoff to end wins — as often routine as stat — and a routine request reaching
    an idle server runs at once: Triton's priority levels only order requests that queue
    together. So before every Triton call a lane waits while any lane with a higher
    Triton priority (smaller number) has a request between a failed attempt and its
    success or dead letter; the stat lane never waits.
    """

    def __init__(self, lane_priority: dict[str, int]) -> None:
        self._priority = dict(lane_priority)
        self._retrying = dict.fromkeys(lane_priority, 0)
        self._changed = asyncio.Event()

    def blocked(self, lane: str) -> bool:
        mine = self._priority[lane]
        return any(n > 0 and self._priority[other] < mine for other, n in self._retrying.items())

    def _notify(self) -> None:
        # Wake every waiter on the old event; later waiters wait on a fresh one.
        self._changed.set()
        self._changed = asyncio.Event()

    def retrying(self, lane: str, delta: int) -> None:
        """Count a request of `lane` into (+1) or out of (-1) retry; synchronous, so it is
        safe in a `finally` of a cancelled task."""
        self._retrying[lane] += delta
        self._notify()

    async def wait_turn(self, lane: str) -> None:
        while self.blocked(lane):
            await self._changed.wait()


class GaveUp(RuntimeError):
    """Triton failed every attempt until the deadline."""

    def __init__(self, attempts: int, cause: InferenceError) -> None:
        super().__init__(f"gave up after {attempts} attempt(s): {cause}")


async def infer_with_retry(
    triton: TritonModelClient,
    gate: LaneRetryGate,
    lane: str,
    req: TriageRequest,
    tensor: np.ndarray[Any, Any],
    priority: int,
    timeout_s: float,
    server: str,
) -> Inference:
    """One model run for `req`, retried until `3 x timeout_s`; raises `GaveUp` after that."""
    deadline = time.monotonic() + timeout_s * 3
    attempt = 0
    try:
        while True:
            # Bounded by our own deadline: a lane starved by a long stat outage still makes
            # its last attempt and dead-letters in bounded time.
            if gate.blocked(lane):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gate.wait_turn(lane), max(deadline - time.monotonic(), 0))
            try:
                return await _attempt(triton, lane, req, tensor, priority, attempt, server)
            except InferenceError as exc:
                metrics.count_triton_failure(lane, req.model_name)
                delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                attempt += 1
                if attempt == 1:
                    gate.retrying(lane, +1)
                if time.monotonic() + delay > deadline:
                    raise GaveUp(attempt, exc) from exc
                log.warning("Triton attempt %d for %s failed (%s); retrying", attempt, req.study_uid, exc)
                await asyncio.sleep(delay)
    finally:
        if attempt:
            gate.retrying(lane, -1)


async def _attempt(
    triton: TritonModelClient,
    lane: str,
    req: TriageRequest,
    tensor: np.ndarray[Any, Any],
    priority: int,
    attempt: int,
    server: str,
) -> Inference:
    attributes: dict[str, Any] = {
        "attempt": attempt,
        "radtriage.model": req.model_name,
        "triton.model_name": req.model_name,
        "triton.priority": priority,
        "server.address": server,
    }
    with tracer.start_as_current_span("triton.infer", kind=SpanKind.CLIENT, attributes=attributes) as span:
        result = await triton.infer_probability(
            req.model_name, tensor, priority, trace_carrier(), req.model_version
        )
        # Triton returns no per-request queue/compute time (only cumulative statistics); the
        # client-side round trip is what we have.
        span.set_attribute("triton.model_version", result.model_version)
        span.set_attribute("triton.client_ms", round(result.elapsed_ms, 3))
        metrics.observe_triton(lane, req.model_name, result.elapsed_ms / 1000.0)
        return result
