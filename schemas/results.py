"""`triage.results.fhir`: the FHIR R4 result for a study, as a `collection` Bundle.

The Bundle holds the DiagnosticReport and the Observations it references, so an
EHR consumer gets one self-contained, R4-valid document per finding.

The record (schema version 2, issue 20) is the plain Bundle, compact UTF-8 JSON
(`application/fhir+json`), so any FHIR-aware consumer (a Kafka Connect HTTP sink, an
integration engine) can take the value as it is; radtriage's own metadata travels in
Kafka headers (`ResultHeaders`, names in `HEADER_NAMES`). `result_record` makes a record
and `read_result` reads one back; nothing else knows the header names. Before version 2
the value was a radtriage JSON envelope holding the Bundle (`FhirResult`): `read_result`
still reads those, so a topic written before the upgrade is read to its end.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import quote, unquote

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.base import Event, EventDecodeError, utcnow
from schemas.requests import FindingCode

# The FHIR media type (R4 http.html#mime) with the version parameter R4 defines for it.
MEDIA_TYPE = "application/fhir+json"
CONTENT_TYPE = f"{MEDIA_TYPE}; fhirVersion=4.0"
HeaderList = list[tuple[str, bytes]]
Headers = Sequence[tuple[str, bytes | None]] | Mapping[str, bytes | None]


class FhirResult(Event):
    """The record before schema version 2: a radtriage envelope with the Bundle inside.

    Read only (`read_result`), for records written before the upgrade; nothing publishes it."""

    study_uid: str
    accession_number: str = ""
    finding: FindingCode
    bundle: dict[str, Any]
    produced_at: datetime = Field(default_factory=utcnow)
    # The finding's request id: one result per finding, whatever is replayed.
    request_id: str = ""


class ResultHeaders(BaseModel):
    """radtriage's metadata of one result record: what the envelope's fields were, in headers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    SCHEMA_VERSION: ClassVar[int] = 2
    # 1 only for a record read from the old envelope (`read_result`); published: 2.
    schema_version: int = 2
    content_type: str = CONTENT_TYPE
    study_uid: str
    accession_number: str = ""
    finding: FindingCode
    # The finding's request id: one result per finding, whatever is replayed.
    request_id: str = ""
    produced_at: datetime = Field(default_factory=utcnow)

    def to_headers(self) -> HeaderList:
        """The Kafka headers, ASCII: text fields percent-encoded where not printable ASCII;
        empty optional fields are left out (read back as "")."""
        values = {
            "schema_version": str(self.schema_version),
            "content_type": self.content_type,
            "study_uid": self.study_uid,
            "accession_number": self.accession_number,
            "finding": self.finding,
            "request_id": self.request_id,
            "produced_at": _as_utc(self.produced_at).isoformat(),
        }
        return [
            (HEADER_NAMES[field], _ascii(value).encode("ascii"))
            for field, value in values.items()
            if value or field in REQUIRED
        ]

    @classmethod
    def from_headers(cls, headers: Headers) -> ResultHeaders:
        """The metadata of a version-2 record; EventDecodeError naming what is missing or wrong."""
        found = _header_map(headers)
        missing = [HEADER_NAMES[f] for f in REQUIRED if f not in found]
        if missing:
            raise EventDecodeError(f"result record: missing header(s) {', '.join(missing)}")
        version = found["schema_version"]
        if not version.isdigit() or int(version) != cls.SCHEMA_VERSION:
            raise EventDecodeError(
                f"result record: {HEADER_NAMES['schema_version']} {version!r} not supported "
                f"(this consumer reads {cls.SCHEMA_VERSION})"
            )
        media = found["content_type"].split(";", 1)[0].strip().lower()
        if media != MEDIA_TYPE:
            raise EventDecodeError(
                f"result record: {HEADER_NAMES['content_type']} {found['content_type']!r} is not {MEDIA_TYPE}"
            )
        try:
            meta = cls.model_validate(found)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<root>"
            name = HEADER_NAMES.get(where, where)
            raise EventDecodeError(f"result record: header {name} invalid: {first['msg']}") from None
        return meta.model_copy(update={"produced_at": _as_utc(meta.produced_at)})


# Field -> Kafka header name: short, namespaced, the same for every record.
HEADER_NAMES: dict[str, str] = {
    "schema_version": "radtriage-schema-version",
    "content_type": "content-type",
    "study_uid": "radtriage-study-uid",
    "accession_number": "radtriage-accession-number",
    "finding": "radtriage-finding",
    "request_id": "radtriage-request-id",
    "produced_at": "radtriage-produced-at",
}
_FIELDS = {name: field for field, name in HEADER_NAMES.items()}
# Names only radtriage's records carry (`content-type` is anyone's).
_OURS = frozenset(name for name in _FIELDS if name.startswith("radtriage-"))
REQUIRED = ("schema_version", "content_type", "study_uid", "finding", "produced_at")
# Printable ASCII but '%' (the escape itself) goes out as it is; anything else as %XX of UTF-8.
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def _ascii(text: str) -> str:
    return quote(text, safe=_SAFE)


def _as_utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _header_map(headers: Headers) -> dict[str, str]:
    """Our headers by field (the first of a repeated name; names case-insensitive); others ignored."""
    items: Iterable[tuple[str, bytes | None]] = headers.items() if isinstance(headers, Mapping) else headers
    found: dict[str, str] = {}
    for name, raw in items:
        field = _FIELDS.get(str(name).lower())
        if field is None or field in found:
            continue
        try:
            found[field] = unquote((raw or b"").decode("ascii"), errors="strict")
        except UnicodeDecodeError:
            raise EventDecodeError(f"result record: header {name} is not ASCII / UTF-8") from None
    return found


@dataclass(frozen=True)
class ResultRecord:
    """One record of the results topic, read back (`read_result`)."""

    meta: ResultHeaders
    bundle: dict[str, Any]
    # Read from the envelope of schema version 1 (written before the upgrade).
    legacy: bool = False

    def fields(self) -> dict[str, Any]:
        """The metadata and the Bundle as one JSON-able object (the envelope's field names), for
        tools that file every topic's records by their `study_uid` (the demo, the benches)."""
        return self.meta.model_dump(mode="json", exclude={"content_type"}) | {"bundle": self.bundle}


def encode_bundle(bundle: Mapping[str, Any]) -> bytes:
    """The Bundle as the record's value: compact JSON, UTF-8 (not \\u-escaped); the bytes
    `json.dumps(separators=(",", ":"), ensure_ascii=False)` writes, and the envelope held,
    at a quarter of the CPU (pydantic's serialiser; bench/result_record.py)."""
    return pydantic_core.to_json(bundle)


def result_record(bundle: Mapping[str, Any], meta: ResultHeaders) -> tuple[bytes, HeaderList]:
    """A result's record: the plain Bundle as the value, the metadata as headers."""
    return encode_bundle(bundle), meta.to_headers()


def read_result(value: bytes | str | None, headers: Headers = ()) -> ResultRecord:
    """A results record, either format: a plain Bundle with our headers (version 2), or the
    envelope of version 1. EventDecodeError with the cause for anything else."""
    if not value:
        raise EventDecodeError("result record: empty value (a tombstone or nothing)")
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EventDecodeError(f"result record: value is not JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise EventDecodeError(f"result record: value is a JSON {type(data).__name__}, not an object")
    if "resourceType" in data:
        _check_bundle(data, "value")
        return ResultRecord(ResultHeaders.from_headers(headers), data)
    if "bundle" in data and "schema_version" in data:
        return _read_envelope(data)
    raise EventDecodeError("result record: value is neither a FHIR Bundle nor a version-1 envelope")


def read_result_meta(value: bytes | str | None, headers: Headers = ()) -> ResultHeaders:
    """A record's metadata alone: from its headers when it has radtriage's (the value is not
    parsed: the reports ledger and the operator page read every record of the topic and
    need no Bundle), else from a version-1 envelope. EventDecodeError as `read_result`."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    if any(str(name).lower() in _OURS for name, _ in items):
        return ResultHeaders.from_headers(headers)
    return read_result(value, headers).meta


def _check_bundle(data: Mapping[str, Any], what: str) -> None:
    if data.get("resourceType") != "Bundle" or not isinstance(data.get("entry"), list):
        raise EventDecodeError(
            f"result record: the {what} is a {data.get('resourceType')!r}, not a Bundle with entries"
        )


def _read_envelope(data: dict[str, Any]) -> ResultRecord:
    try:
        old = FhirResult.model_validate(data)
    except ValidationError as exc:
        raise EventDecodeError(
            f"result record: not a version-1 envelope: {exc.error_count()} invalid field(s)"
        ) from None
    if old.schema_version != FhirResult.SCHEMA_VERSION:
        raise EventDecodeError(f"result record: envelope schema_version {old.schema_version} not supported")
    _check_bundle(old.bundle, "envelope's bundle")
    meta = ResultHeaders(
        schema_version=old.schema_version,
        study_uid=old.study_uid,
        accession_number=old.accession_number,
        finding=old.finding,
        request_id=old.request_id,
        produced_at=_as_utc(old.produced_at),
    )
    return ResultRecord(meta, old.bundle, legacy=True)
