"""The pure half of bench/fhir_readable.py: reading a search's answer, the report keys of a
study's results, and the re-keyed copy the bench POSTs straight to the server as its peer."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from bench.fhir_readable import found_report, fresh_copy, report_keys
from processors.fhir_report import build_result_bundle
from processors.fhir_transaction import build_transaction
from tests.support.findings import ich_result

STUDY = "1.2.826.0.42.7.1"


def _bundle(accession: str = "DL005001") -> dict[str, Any]:
    return build_result_bundle(ich_result(STUDY, STUDY + ".2", accession_number=accession))


def _search(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def test_a_search_without_a_report_has_not_found_it() -> None:
    assert found_report(_search()) == (False, None)
    outcome = {"resourceType": "OperationOutcome", "issue": []}
    assert found_report({"entry": [{"resource": outcome, "search": {"mode": "outcome"}}]}) == (False, None)


def test_a_found_report_gives_its_earliest_last_updated() -> None:
    late = {"resourceType": "DiagnosticReport", "meta": {"lastUpdated": "2026-12-07T14:50:01.250+00:00"}}
    early = {"resourceType": "DiagnosticReport", "meta": {"lastUpdated": "2026-12-07T14:50:01.125+00:00"}}
    found, at = found_report(_search(late, early))
    assert found
    assert at == datetime(2026, 12, 7, 14, 50, 1, 125000, tzinfo=UTC).timestamp()
    assert found_report(_search({"resourceType": "DiagnosticReport"})) == (True, None)


def test_the_report_keys_are_those_the_transaction_is_conditional_on() -> None:
    bundle = _bundle()
    _, key = build_transaction(bundle)
    # The same result twice (a replay) is one report to find.
    assert report_keys([{"bundle": bundle}, {"bundle": bundle}]) == {key.token}


def test_the_direct_copy_is_a_new_report_the_accession_search_does_not_find() -> None:
    bundle = _bundle()
    before = json.dumps(bundle)
    copy = fresh_copy(bundle, "DL005001")
    _, key = build_transaction(bundle)
    _, copy_key = build_transaction(copy)
    assert copy_key != key
    kinds = {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}
    copied = {e["resource"]["resourceType"]: e["resource"] for e in copy["entry"]}
    # The model's Device is created once on the server: the copy keeps it, as the stage's POST does.
    assert copied["Device"]["id"] == kinds["Device"]["id"]
    assert copied["Observation"]["id"] != kinds["Observation"]["id"]
    # Its references follow the new ids: the report still points to its own Observation.
    refs = [r["reference"] for r in copied["DiagnosticReport"]["result"]]
    assert f"urn:uuid:{copied['Observation']['id']}" in refs
    values = [i.get("value") for i in copied["DiagnosticReport"]["identifier"]]
    assert "DIRECT-DL005001" in values and "DL005001" not in values
    # The rest is the same report.
    assert copied["DiagnosticReport"]["conclusion"] == kinds["DiagnosticReport"]["conclusion"]
    assert json.dumps(bundle) == before  # the original is untouched
