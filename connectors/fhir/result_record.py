"""A `triage.results.fhir` record -> the FHIR Bundle it carries and when it was made (pure).

What the FHIR read/search view (connectors/fhir/results_view.py) needs of a record, read
by the one reader of the topic's format (schemas/results.py `read_result`): the plain
Bundle with radtriage's metadata in headers, or, for records written before the upgrade,
the radtriage JSON envelope holding the Bundle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from schemas.base import EventDecodeError
from schemas.results import read_result


class UnreadableResult(ValueError):
    """The record is not a results record this reader understands (the reason is the message)."""


@dataclass(frozen=True)
class DecodedResult:
    bundle: Mapping[str, Any]
    # When the report stage produced it: the resources' meta.lastUpdated.
    produced_at: datetime


def decode_result(
    value: bytes | None, headers: Sequence[tuple[str, bytes]] = (), timestamp_ms: int | None = None
) -> DecodedResult:
    """The Bundle of one record; UnreadableResult with the cause otherwise.

    Either format (schemas/results.py `read_result`): the plain Bundle with radtriage's
    headers, or the envelope of records written before the upgrade. `timestamp_ms` (the
    Kafka record's) is not needed: both formats say when the report was produced."""
    del timestamp_ms
    try:
        record = read_result(value, headers)
    except EventDecodeError as exc:
        raise UnreadableResult(str(exc)) from None
    return DecodedResult(record.bundle, record.meta.produced_at)
