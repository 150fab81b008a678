"""Publishing from the event loop: the blocking acks=all publish runs on a worker thread,
and its outcomes feed the health check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

from connectors.publisher import EventPublisher, PublishError, RecordMetadata
from schemas.base import Event

__all__ = ["AsyncPublisher", "PublishError", "PublishState"]


@dataclass
class PublishState:
    """When the last publish succeeded and failed (monotonic seconds; None: never)."""

    last_ok: float | None = None
    last_failure: float | None = None
    failure: str = ""

    def failing(self, now: float, window_s: float) -> bool:
        """True if the latest outcome is a failure less than `window_s` old. An old failure
        stops counting, so health recovers even when nothing is being published."""
        if self.last_failure is None:
            return False
        newer_than_ok = self.last_ok is None or self.last_failure > self.last_ok
        return newer_than_ok and now - self.last_failure < window_s


class AsyncPublisher:
    def __init__(self, publisher: EventPublisher, *, owned: bool) -> None:
        self.publisher = publisher
        self.owned = owned
        self.state = PublishState()

    async def publish(
        self, topic: str, key: str, event: Event, headers: Mapping[str, str] | None = None
    ) -> RecordMetadata:
        """Publish and wait for acks=all without blocking the loop; raises PublishError."""
        try:
            # to_thread copies the context: the publisher's thread sees the current span.
            metadata = await asyncio.to_thread(self.publisher.publish, topic, key, event, headers)
        except PublishError as exc:
            self.state.last_failure, self.state.failure = time.monotonic(), str(exc)
            raise
        self.state.last_ok = time.monotonic()
        return metadata

    def close(self) -> None:
        if self.owned:
            self.publisher.close()
