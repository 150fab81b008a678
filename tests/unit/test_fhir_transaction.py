"""A report Bundle as a conditional FHIR transaction (processors/fhir_transaction.py), and
what is read back from a server's answer."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

import pytest

from processors.fhir_report import URI_SYSTEM, build_result_bundle, resource_ids
from processors.fhir_transaction import (
    UnsendableBundle,
    build_transaction,
    encode,
    outcome_text,
    stored_locations,
)
from tests.support.findings import finding, gallery


def _query(url: str) -> str:
    return unquote(url.split("?", 1)[1])


@pytest.mark.parametrize("name", sorted(gallery()))
def test_every_entry_is_conditional_on_radtriage_s_own_id(name: str) -> None:
    bundle = build_result_bundle(gallery()[name])
    tx, key = build_transaction(bundle)
    assert tx["type"] == "transaction" and len(tx["entry"]) == len(bundle["entry"])
    for sent, original in zip(tx["entry"], bundle["entry"], strict=True):
        resource, request = sent["resource"], sent["request"]
        rid = original["resource"]["id"]
        assert "id" not in resource, "the server assigns its own ids"
        assert sent["fullUrl"] == original["fullUrl"] == f"urn:uuid:{rid}"
        assert resource["identifier"][0] == {"system": URI_SYSTEM, "value": f"urn:uuid:{rid}"}
        token = f"identifier={URI_SYSTEM}|urn:uuid:{rid}"
        if resource["resourceType"] == "Device":
            assert request["method"] == "POST" and request["url"] == "Device"
            assert unquote(request["ifNoneExist"]) == token
        else:
            assert request["method"] == "PUT"
            assert request["url"].startswith(resource["resourceType"] + "?")
            assert _query(request["url"]) == token
    report_id, _ = resource_ids(gallery()[name])
    assert key.token == f"{URI_SYSTEM}|urn:uuid:{report_id}"


def test_the_original_identifiers_and_references_are_kept_and_the_bundle_is_untouched() -> None:
    bundle = build_result_bundle(finding())
    before = json.dumps(bundle, sort_keys=True)
    tx, _ = build_transaction(bundle)
    assert json.dumps(bundle, sort_keys=True) == before
    report = tx["entry"][0]["resource"]
    assert [i.get("value") for i in report["identifier"][1:]] == [
        i.get("value") for i in bundle["entry"][0]["resource"]["identifier"]
    ]
    # References between entries stay urn:uuid fullUrls, for the server to resolve.
    assert report["result"][0]["reference"] == tx["entry"][1]["fullUrl"]
    assert json.loads(encode(tx)) == tx


def test_an_amended_report_has_the_same_key_as_the_one_it_amends() -> None:
    first, amended = finding(), finding(amends_request_id="earlier")
    _, a = build_transaction(build_result_bundle(first))
    tx, b = build_transaction(build_result_bundle(amended))
    assert a == b
    assert tx["entry"][0]["resource"]["status"] == "amended"


@pytest.mark.parametrize(
    ("bundle", "why"),
    [
        ({"resourceType": "Bundle"}, "no entries"),
        ({"entry": [{"resource": {"resourceType": "Observation"}}]}, "no resourceType or id"),
        ({"entry": [{"fullUrl": "x"}]}, "no resource"),
        ({"entry": [{"resource": {"resourceType": "Observation", "id": "o"}}]}, "no DiagnosticReport"),
        (
            {"entry": [{"resource": {"resourceType": "DiagnosticReport", "id": i}} for i in "ab"]},
            "more than one DiagnosticReport",
        ),
        (
            {"entry": [{"resource": {"resourceType": "DiagnosticReport", "id": "a", "identifier": "x"}}]},
            "not a list",
        ),
    ],
)
def test_a_bundle_that_cannot_be_a_transaction_says_why(bundle: dict[str, Any], why: str) -> None:
    with pytest.raises(UnsendableBundle, match=why):
        build_transaction(bundle)


def test_an_operation_outcome_is_read_as_its_issues() -> None:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "processing", "diagnostics": "HAPI-1821: bad status"},
            {
                "severity": "error",
                "code": "invalid",
                "details": {"text": "missing subject"},
                "expression": ["DiagnosticReport.subject"],
            },
        ],
    }
    assert outcome_text(json.dumps(body).encode()) == (
        "error processing: HAPI-1821: bad status; "
        "error invalid: missing subject (at DiagnosticReport.subject)"
    )
    assert outcome_text(b"<html>Bad gateway</html>") == "<html>Bad gateway</html>"
    assert outcome_text(b"") == "(empty body)"
    assert len(outcome_text(b"x" * 5000, limit=100)) == 100


def test_the_server_s_locations_are_read_from_a_transaction_response() -> None:
    body = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [
            {"response": {"status": "201 Created", "location": "DiagnosticReport/7/_history/1"}},
            {"response": {"status": "200 OK"}},
            "junk",
        ],
    }
    assert stored_locations(json.dumps(body).encode()) == ["DiagnosticReport/7/_history/1"]
    assert stored_locations(b"not json") == [] and stored_locations(b"[]") == []
