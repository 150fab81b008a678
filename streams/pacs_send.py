"""Sending one result object to one PACS until stored or given up on: a C-STORE
(streams/dicom_send.py, in a thread) or a STOW-RS (streams/stow_send.py), retried with
exponential backoff to `dispatch.retry_deadline_s` while the destination's answer says a
later try may succeed. Used by the pacs-export stage (streams/stages/pacs_export.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from radtriage import metrics
from radtriage.settings import DicomDestination, DispatchSettings, StowDestination

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)


def backoff_delays(settings: DispatchSettings) -> list[float]:
    """The waits between tries, in order, whose sum stays within the deadline (pure)."""
    delays: list[float] = []
    delay, total = settings.retry_initial_s, 0.0
    while total < settings.retry_deadline_s:
        wait = min(delay, settings.retry_max_s, settings.retry_deadline_s - total)
        delays.append(wait)
        total += wait
        delay *= 2
    return delays


class Outcome(Protocol):
    """One try's outcome, C-STORE (streams/dicom_send.StoreOutcome) or STOW-RS
    (streams/stow_send.StowOutcome)."""

    @property
    def stored(self) -> bool: ...
    @property
    def retryable(self) -> bool: ...
    @property
    def status_text(self) -> str: ...
    @property
    def detail(self) -> str: ...


def sender(
    destination: DicomDestination | StowDestination, ds: Dataset, timeout_s: float
) -> Callable[[], Awaitable[Outcome]]:
    """One try of sending `ds` to `destination`, by its kind."""
    # Imported here, not at the worker's start: pynetdicom and the Part 10 encoder are
    # needed only where a destination is configured (see `register`).
    if isinstance(destination, StowDestination):
        from streams.stow_send import stow

        return lambda: stow(destination, ds, timeout_s)
    from streams.dicom_send import c_store

    return lambda: asyncio.to_thread(c_store, destination, ds, timeout_s)


async def send_until_deadline(
    destination: DicomDestination | StowDestination,
    ds: Dataset,
    settings: DispatchSettings,
    what: str,
    on_first_retry: Callable[[Outcome], Awaitable[None]] | None = None,
) -> tuple[Outcome, int]:
    """Send `ds`, retrying what may succeed later; the last outcome and the tries made."""
    waits = iter(backoff_delays(settings))
    send = sender(destination, ds, settings.timeout_s)
    tries = 0
    while True:
        tries += 1
        outcome = await send()
        if outcome.stored or not outcome.retryable:
            return outcome, tries
        wait = next(waits, None)
        if wait is None:
            return outcome, tries
        metrics.PACS_EXPORTS.labels(destination.name, what, "retried").inc()
        log.warning(
            "%s to %s: %s %s; try %d again in %.1f s",
            what,
            destination.name,
            outcome.status_text,
            outcome.detail,
            tries + 1,
            wait,
        )
        if tries == 1 and on_first_retry is not None:
            await on_first_retry(outcome)
        await asyncio.sleep(wait)
