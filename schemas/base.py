"""Common base of every Kafka event: JSON on the wire, a schema_version, strict fields.

Events are parsed with `Event.from_bytes`, so a consumer that meets a message it
cannot read gets one exception type (`EventDecodeError`) carrying the reason, which
the stream turns into a dead-letter event instead of a stuck partition.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError


def utcnow() -> datetime:
    return datetime.now(UTC)


class EventDecodeError(ValueError):
    """A message on a topic that does not match the topic's schema."""


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Bumped on an incompatible change; consumers reject versions they do not know.
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: int = 1

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes | str | None) -> Self:
        if data is None:
            raise EventDecodeError(f"{cls.__name__}: empty message value")
        try:
            event = cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<root>"
            raise EventDecodeError(
                f"{cls.__name__}: {exc.error_count()} invalid field(s); first at {where}: {first['msg']}"
            ) from exc
        if event.schema_version != cls.SCHEMA_VERSION:
            raise EventDecodeError(
                f"{cls.__name__}: schema_version {event.schema_version} not supported "
                f"(this consumer reads {cls.SCHEMA_VERSION})"
            )
        return event
