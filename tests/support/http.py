"""The HTTP server (`connectors.http.server.start_http`) in an event loop of a test's thread."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from connectors.http.server import HttpHandle, start_http
from connectors.publisher import EventPublisher
from radtriage.settings import Settings
from tests.support.settings import isolated_settings


def http_settings(
    home: Path, bootstrap: str, topics: Iterable[str] = ("instances",), suffix: str | None = None
) -> Settings:
    """Isolated settings (see `isolated_settings`) for a server on a free loopback port that
    gives up producing after 10 s."""
    settings = isolated_settings(home, bootstrap, topics, suffix=suffix)
    settings.kafka.produce_timeout_s = 10.0
    settings.http.port = 0
    settings.http.bind_address = "127.0.0.1"
    return settings


@dataclass
class Intake:
    """A running HTTP server: its settings, handle and the loop it runs in; `topic` is the
    one the test reads back (the field of `settings.topics` named `topic_field`)."""

    settings: Settings
    handle: HttpHandle
    loop: asyncio.AbstractEventLoop
    topic_field: str = "instances"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.handle.port}"

    @property
    def topic(self) -> str:
        return str(getattr(self.settings.topics, self.topic_field))


def start_intake(
    settings: Settings,
    loop: asyncio.AbstractEventLoop,
    publisher: EventPublisher | None = None,
    topic_field: str = "instances",
) -> Intake:
    handle = asyncio.run_coroutine_threadsafe(start_http(settings, publisher), loop).result(30)
    return Intake(settings, handle, loop, topic_field)


def stop_intake(intake: Intake) -> None:
    asyncio.run_coroutine_threadsafe(intake.handle.stop(), intake.loop).result(60)
