"""Settings isolated per test: a home of its own and topics no other test writes to, so that
"exactly these events" can be asserted over a whole topic on the session's shared broker."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path

from radtriage.kafka_admin import ensure_topics
from radtriage.settings import Settings


def unique_suffix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def isolated_settings(
    home: Path,
    bootstrap: str,
    topics: Iterable[str] = ("instances",),
    *,
    suffix: str | None = None,
    partitions: int | None = None,
) -> Settings:
    """Settings on `home` and the broker at `bootstrap` whose `topics` (fields of
    `settings.topics`) are renamed `<default name>.<suffix>` (a fresh `unique_suffix()` unless
    given); with `partitions`, those topics are created with that many partitions."""
    suffix = suffix or unique_suffix()
    settings = Settings(home=home)
    settings.kafka.bootstrap_servers = bootstrap
    names = []
    for field in topics:
        names.append(f"{getattr(settings.topics, field)}.{suffix}")
        setattr(settings.topics, field, names[-1])
    if partitions is not None:
        ensure_topics(bootstrap, dict.fromkeys(names, partitions))
    return settings
