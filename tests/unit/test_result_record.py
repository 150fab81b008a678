"""The results topic's record (schemas/results.py): the plain FHIR Bundle as the value,
radtriage's metadata in headers; the old envelope still read; anything else a clear
EventDecodeError, which each reader (the ledger, the operator page, ehr-fhir's loop, the
/fhir view) turns into its own skip, count or dead letter."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from processors.fhir_report import build_result_bundle
from radtriage.demo import Outcome, _apply
from radtriage.operator.decode import Observed, Record, Unreadable, decode, topic_kinds
from radtriage.replay import REPLAY_HEADER, Coordinates, replay_headers
from radtriage.settings import Settings, Topics
from schemas.base import EventDecodeError
from schemas.deadletter import DeadLetter
from schemas.results import (
    CONTENT_TYPE,
    HEADER_NAMES,
    FhirResult,
    ResultHeaders,
    read_result,
    read_result_meta,
    result_record,
)
from streams.app import header_text
from streams.published_ledger import report_key
from tests.support.findings import finding

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
META = ResultHeaders(
    study_uid="1.2.840.99.1",
    accession_number="ACC42",
    finding="ICH",
    request_id="req-1",
    produced_at=T0,
)


def _record() -> tuple[dict[str, object], bytes, list[tuple[str, bytes]]]:
    bundle = build_result_bundle(finding())
    value, headers = result_record(bundle, META)
    return bundle, value, headers


def test_the_value_is_the_bundle_as_built_and_the_metadata_is_in_headers() -> None:
    bundle, value, headers = _record()
    # Exactly the Bundle: compact JSON, UTF-8, nothing around it.
    assert value == json.dumps(bundle, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert json.loads(value) == bundle and json.loads(value)["resourceType"] == "Bundle"
    assert dict(headers) == {
        "radtriage-schema-version": b"2",
        "content-type": b"application/fhir+json; fhirVersion=4.0",
        "radtriage-study-uid": b"1.2.840.99.1",
        "radtriage-accession-number": b"ACC42",
        "radtriage-finding": b"ICH",
        "radtriage-request-id": b"req-1",
        "radtriage-produced-at": b"2026-11-24T12:00:00+00:00",
    }
    assert {name for name, _ in headers} <= set(HEADER_NAMES.values())


def test_round_trip_as_a_list_or_a_mapping_of_headers() -> None:
    bundle, value, headers = _record()
    for given in (headers, dict(headers), [*headers, ("traceparent", b"00-ab-cd-01")]):
        record = read_result(value, given)
        assert record.bundle == bundle and record.meta == META and not record.legacy
    assert read_result(value, headers).fields() == {
        "schema_version": 2,
        "study_uid": "1.2.840.99.1",
        "accession_number": "ACC42",
        "finding": "ICH",
        "request_id": "req-1",
        "produced_at": "2026-11-24T12:00:00Z",
        "bundle": bundle,
    }


def test_empty_optional_fields_are_left_out_and_read_back_empty() -> None:
    meta = ResultHeaders(study_uid="1.2", finding="LVO", produced_at=T0)
    value, headers = result_record({"resourceType": "Bundle", "entry": []}, meta)
    names = {n for n, _ in headers}
    assert "radtriage-accession-number" not in names and "radtriage-request-id" not in names
    assert read_result(value, headers).meta == meta


def test_header_values_are_ascii_whatever_the_text() -> None:
    meta = META.model_copy(update={"accession_number": "Å-100% ü"})
    value, headers = result_record({"resourceType": "Bundle", "entry": []}, meta)
    raw = dict(headers)["radtriage-accession-number"]
    assert raw == b"%C3%85-100%25 %C3%BC" and raw.decode("ascii")
    assert read_result(value, headers).meta.accession_number == "Å-100% ü"


def test_a_record_of_the_old_envelope_is_still_read() -> None:
    bundle = build_result_bundle(finding())
    old = FhirResult(
        study_uid="1.2.840.99.1", accession_number="ACC42", finding="ICH", bundle=bundle, request_id="req-1"
    )
    record = read_result(old.to_bytes())
    assert record.legacy and record.bundle == bundle
    assert record.meta.study_uid == "1.2.840.99.1" and record.meta.request_id == "req-1"
    assert record.meta.schema_version == 1 and record.meta.produced_at == old.produced_at
    # Its produced_at without a zone (written by an older producer) is UTC.
    naive = old.model_copy(update={"produced_at": T0.replace(tzinfo=None)}).to_bytes()
    assert read_result(naive).meta.produced_at == T0


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (None, "empty value"),
        (b"", "empty value"),
        (b"\xff\xfe", "not JSON"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON list, not an object"),
        (b'{"hello": "world"}', "neither a FHIR Bundle nor"),
        (b'{"resourceType": "Patient"}', "'Patient', not a Bundle"),
        (b'{"resourceType": "Bundle"}', "not a Bundle with entries"),
        (b'{"schema_version": 1, "bundle": {}}', "not a version-1 envelope"),
        (
            b'{"schema_version": 1, "study_uid": "1", "finding": "ICH", "bundle": {"resourceType": "X"}}',
            "envelope's bundle is a 'X'",
        ),
        (
            b'{"schema_version": 7, "study_uid": "1", "finding": "ICH", "bundle": {}}',
            "schema_version 7 not supported",
        ),
    ],
)
def test_garbage_is_a_clear_decode_error(value: bytes | None, why: str) -> None:
    with pytest.raises(EventDecodeError, match=why):
        read_result(value, META.to_headers())


def test_missing_or_invalid_headers_are_named() -> None:
    _, value, headers = _record()
    with pytest.raises(EventDecodeError, match=r"missing header.*radtriage-study-uid"):
        read_result(value, [h for h in headers if h[0] != "radtriage-study-uid"])
    with pytest.raises(EventDecodeError, match=r"missing header.*radtriage-schema-version.*content-type"):
        read_result(value, [])

    def changed(name: str, raw: bytes) -> list[tuple[str, bytes]]:
        return [(n, raw if n == name else v) for n, v in headers]

    with pytest.raises(EventDecodeError, match=r"radtriage-schema-version '3' not supported"):
        read_result(value, changed("radtriage-schema-version", b"3"))
    with pytest.raises(EventDecodeError, match=r"content-type 'application/json' is not application/fhir"):
        read_result(value, changed("content-type", b"application/json"))
    with pytest.raises(EventDecodeError, match="header radtriage-finding invalid"):
        read_result(value, changed("radtriage-finding", b"NOT_A_FINDING"))
    with pytest.raises(EventDecodeError, match="header radtriage-produced-at invalid"):
        read_result(value, changed("radtriage-produced-at", b"yesterday"))
    with pytest.raises(EventDecodeError, match="not ASCII"):
        read_result(value, changed("radtriage-study-uid", "1.2.é".encode("latin-1")))
    # Media type parameters and case do not matter.
    ok = read_result(value, changed("content-type", b"Application/FHIR+json"))
    assert ok.meta.content_type == "Application/FHIR+json"
    assert CONTENT_TYPE == "application/fhir+json; fhirVersion=4.0"


def test_the_metadata_alone_is_read_from_the_headers_without_the_bundle() -> None:
    bundle, value, headers = _record()
    assert read_result_meta(value, headers) == META
    # The value is not parsed when radtriage's headers are there...
    assert read_result_meta(b"not even json", headers) == META
    # ...but they must be complete; without them the value must be an envelope.
    with pytest.raises(EventDecodeError, match="missing header"):
        read_result_meta(value, [h for h in headers if h[0] != "radtriage-finding"])
    with pytest.raises(EventDecodeError, match="missing header"):
        read_result_meta(value, [("content-type", b"application/fhir+json")])
    old = FhirResult(study_uid="1.2.840.99.1", finding="ICH", bundle=bundle, request_id="r").to_bytes()
    assert read_result_meta(old).request_id == "r"
    with pytest.raises(EventDecodeError, match="not JSON"):
        read_result_meta(b"\x00garbage")


def test_the_reports_ledger_knows_both_formats_and_skips_the_rest() -> None:
    bundle, value, headers = _record()
    assert report_key(value, headers) == "req-1"
    old = FhirResult(study_uid="1", finding="ICH", bundle=bundle, request_id="req-0").to_bytes()
    assert report_key(old) == "req-0"
    assert report_key(value, META.model_copy(update={"request_id": ""}).to_headers()) is None
    with pytest.raises(EventDecodeError):  # the ledger's reader skips it (PublishedLedger._add)
        report_key(value, ())


def test_the_operator_page_reads_the_metadata_of_either_format() -> None:
    topics = Topics()
    kinds = topic_kinds(topics)
    bundle, value, headers = _record()
    old = FhirResult(study_uid="1.2.840.99.1", finding="ICH", bundle=bundle, produced_at=T0 + timedelta(1))
    for raw, hdrs, produced in ((value, headers, T0), (old.to_bytes(), [], T0 + timedelta(1))):
        seen = decode(Record(topics.results_fhir, 0, 3, raw, hdrs), kinds)
        assert isinstance(seen, Observed)
        assert isinstance(seen.event, ResultHeaders) and seen.event.study_uid == "1.2.840.99.1"
        assert seen.event.produced_at == produced
    bad = decode(Record(topics.results_fhir, 0, 4, value, []), kinds)
    assert isinstance(bad, Unreadable) and "missing header" in bad.reason


def test_a_dead_letter_keeps_the_headers_a_replay_sends_again() -> None:
    _, value, headers = _record()
    kept = header_text([*headers, ("traceparent", b"00-old"), ("raw", b"\xff\x00")])
    letter = DeadLetter(source_topic="triage.results.fhir", stage="ehr-fhir", error="x", headers=kept)
    letter = DeadLetter.from_bytes(letter.to_bytes())
    # Faust may hand the headers as a mapping: the same text.
    assert header_text(dict(headers)) == {k: v.decode() for k, v in headers}
    coords = Coordinates("triage.deadletter", 1, 9)
    sent = replay_headers(letter, coords, b"00-new")
    assert sent[: len(headers)] == headers and ("raw", b"\xff\x00") in sent
    assert (REPLAY_HEADER, b"triage.deadletter:1:9") in sent and ("traceparent", b"00-new") in sent
    assert ("traceparent", b"00-old") not in sent
    # What was replayed reads as the record that failed.
    assert read_result(value, sent).meta == META
    # A letter written before dead letters kept headers: just the mark and the trace.
    older = DeadLetter.from_bytes(
        json.dumps({"source_topic": "t", "stage": "s", "error": "e", "schema_version": 1}).encode()
    )
    assert replay_headers(older, coords, None) == [(REPLAY_HEADER, b"triage.deadletter:1:9")]


def test_the_demo_shows_a_plain_bundle_report_as_it_showed_the_envelope() -> None:
    settings = Settings()
    bleed = finding(p=0.93)
    value, headers = result_record(
        build_result_bundle(bleed),
        ResultHeaders(
            study_uid=bleed.study_uid, finding="ICH", produced_at=bleed.ready_at + timedelta(seconds=3)
        ),
    )
    old = FhirResult(
        study_uid=bleed.study_uid,
        finding="ICH",
        bundle=build_result_bundle(bleed),
        produced_at=bleed.ready_at + timedelta(seconds=3),
    )
    shown = []
    for data in (read_result(value, headers).fields(), json.loads(old.to_bytes())):
        outcome = Outcome(case="bleed", study_uid=bleed.study_uid, expected="ICH")
        _apply(outcome, settings.topics.results_fhir, data, settings)
        shown.append(outcome)
    assert shown[0] == shown[1]
    assert shown[0].report and shown[0].finding == "ICH" and shown[0].probability == 0.93
    assert shown[0].positive is True and shown[0].ready_to_report_ms == 3000.0
