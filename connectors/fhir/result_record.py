"""A `triage.results.fhir` record -> the FHIR Bundle it carries and when it was made (pure).

The one place that knows the record's format, so that the FHIR read/search view
(connectors/fhir/results_view.py) follows the topic when its format changes: today a
radtriage JSON envelope (schemas/results.py `FhirResult`) holding the Bundle; a later
change puts the plain Bundle on the topic with radtriage's metadata in headers, and only
`decode_result` changes with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from schemas.results import FhirResult


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

    `headers` and `timestamp_ms` (the Kafka record's) are unused by the envelope format but
    are what the plain-Bundle format will carry its metadata in."""
    del headers, timestamp_ms
    if not value:
        raise UnreadableResult("empty record (a tombstone or nothing)")
    try:
        result = FhirResult.model_validate_json(value)
    except ValidationError as exc:
        raise UnreadableResult(
            f"not a FhirResult envelope: {exc.error_count()} validation error(s)"
        ) from None
    bundle = result.bundle
    if bundle.get("resourceType") != "Bundle" or not isinstance(bundle.get("entry"), list):
        raise UnreadableResult("the envelope's bundle is not a Bundle with entries")
    produced = result.produced_at
    if produced.tzinfo is None:
        produced = produced.replace(tzinfo=UTC)
    return DecodedResult(bundle, produced)
