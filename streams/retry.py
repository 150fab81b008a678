"""One delivery retried to a deadline with doubling, capped backoff: what the HL7 and FHIR
senders share (streams/hl7_sender.py, streams/fhir_sender.py). A send either answers (for
good, whatever the answer says) or raises the sender's transient error, which is retried."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Retry:
    deadline_s: float
    initial_s: float
    max_s: float

    def delay(self, attempt: int) -> float:
        """Backoff after failed attempt `attempt` (1-based): doubling, capped."""
        return float(min(self.max_s, self.initial_s * 2 ** (attempt - 1)))


@dataclass(frozen=True)
class Undelivered:
    reason: str  # the last attempt's failure
    attempts: int


async def until_answered(
    send: Callable[[], Awaitable[T]],
    retry: Retry,
    transient: type[Exception],
    what: str,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> tuple[T, int] | Undelivered:
    """`send` until it answers (the answer and the attempts made) or, raising `transient`
    each time, the deadline passes (Undelivered with the last failure)."""
    give_up = clock() + retry.deadline_s
    attempts = 0
    while True:
        attempts += 1
        try:
            return await send(), attempts
        except transient as exc:
            wait = retry.delay(attempts)
            if clock() + wait >= give_up:
                return Undelivered(f"{exc} (after {attempts} attempt(s) in {retry.deadline_s:g} s)", attempts)
            log.warning("%s attempt %d failed (%s); again in %.1f s", what, attempts, exc, wait)
            await sleep(wait)
