"""The HTTP server: `start_http` in an event loop of a test's thread, or the environment and
the health check of a `radtriage http` process."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from connectors.http.server import HttpHandle, start_http
from connectors.publisher import EventPublisher
from radtriage.kafka_admin import ensure_topics
from radtriage.operator import page as operator_page
from radtriage.settings import Settings
from tests.support.kafka import PARTITIONS
from tests.support.process import start_radtriage
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
    """The HTTP port as `radtriage http` serves it: the intake and the operator page."""
    pages = [operator_page]
    handle = asyncio.run_coroutine_threadsafe(start_http(settings, publisher, pages), loop).result(30)
    return Intake(settings, handle, loop, topic_field)


def stop_intake(intake: Intake) -> None:
    asyncio.run_coroutine_threadsafe(intake.handle.stop(), intake.loop).result(60)


@contextmanager
def running_intake(
    settings: Settings,
    loop: asyncio.AbstractEventLoop,
    publisher: EventPublisher | None = None,
    topic_field: str = "instances",
) -> Iterator[Intake]:
    """`start_intake` with its topic created first, stopped on the way out (the tests'
    intake fixtures)."""
    topic = str(getattr(settings.topics, topic_field))
    ensure_topics(settings.kafka.bootstrap_servers, {topic: PARTITIONS})
    intake = start_intake(settings, loop, publisher, topic_field)
    try:
        yield intake
    finally:
        stop_intake(intake)


def http_env(home: Path, bootstrap: str, port: int, **extra: str) -> dict[str, str]:
    """The environment of a `radtriage http` process on the loopback `port` (this process's
    environment without RADTRIAGE_SETTINGS_JSON, plus `extra` RADTRIAGE_* variables)."""
    env = {k: v for k, v in os.environ.items() if k != "RADTRIAGE_SETTINGS_JSON"}
    env.update(
        {
            "RADTRIAGE_HOME": str(home),
            "RADTRIAGE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "RADTRIAGE_HTTP__PORT": str(port),
            "RADTRIAGE_HTTP__BIND_ADDRESS": "127.0.0.1",
            **extra,
        }
    )
    return env


def healthy(base: str, session: requests.Session | None = None) -> bool:
    """Whether the server at `base` answers GET /healthz with 200 (false while it refuses
    connections)."""
    try:
        return (session or requests).get(f"{base}/healthz", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def start_http_process(settings: Settings, port: int, log: Path, topic_field: str) -> subprocess.Popen[bytes]:
    """`radtriage http` on `port` with the home, broker and `settings.topics.<topic_field>`
    of `settings` (no tracing exporter), in the test's own session: SIGTERM reaches only it."""
    topic = {f"RADTRIAGE_TOPICS__{topic_field.upper()}": str(getattr(settings.topics, topic_field))}
    env = http_env(
        settings.home, settings.kafka.bootstrap_servers, port, RADTRIAGE_TELEMETRY__EXPORTER="none", **topic
    )
    return start_radtriage(["http"], env, log, new_session=False)
