"""OperationOutcome builder and the CapabilityStatement (pure functions)."""

from __future__ import annotations

import json

from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome

from connectors.fhir.capability import capability_statement
from connectors.fhir.outcome import (
    MAX_DIAGNOSTICS,
    MAX_ISSUES,
    Issue,
    operation_outcome,
    outcome_bytes,
    transient,
)


def test_outcome_is_valid_r4_and_keeps_expressions() -> None:
    oo = operation_outcome([Issue("required", "ServiceRequest.intent: missing", ("ServiceRequest.intent",))])
    model = OperationOutcome.model_validate(oo)
    (issue,) = model.issue
    assert (issue.severity, issue.code, issue.expression) == ("error", "required", ["ServiceRequest.intent"])


def test_outcome_is_bounded_however_many_issues() -> None:
    issues = [Issue("structure", "x" * 10_000, (f"a[{i}]",)) for i in range(500)]
    oo = OperationOutcome.model_validate(json.loads(outcome_bytes(issues)))
    assert len(oo.issue) == MAX_ISSUES + 1 and oo.issue[-1].code == "too-costly"
    assert all(len(i.diagnostics or "") <= MAX_DIAGNOSTICS for i in oo.issue)


def test_empty_outcome_still_has_an_issue() -> None:
    assert OperationOutcome.model_validate(operation_outcome([])).issue[0].severity == "information"


def test_transient_is_503_with_retry_after() -> None:
    err = transient("Kafka down", 7)
    assert err.status == 503 and err.headers == {"Retry-After": "7"} and err.issues[0].code == "transient"
    assert "Kafka down" not in str(err)  # str() is for logs: codes only


def test_capability_statement_says_exactly_what_is_supported() -> None:
    cs = CapabilityStatement.model_validate(capability_statement("https://x", "1.2.3"))
    assert cs.fhirVersion == "4.0.1" and cs.kind == "instance" and cs.status == "active"
    assert cs.format == ["application/fhir+json", "json"]
    assert cs.implementation is not None and cs.implementation.url == "https://x/fhir"
    (rest,) = cs.rest
    assert rest.mode == "server"
    assert [(r.type, [i.code for i in r.interaction]) for r in rest.resource] == [
        ("ServiceRequest", ["create"]),
        ("ImagingStudy", ["create"]),
        # The results (tests/unit/test_fhir_search.py checks their search parameters).
        ("DiagnosticReport", ["read", "search-type"]),
        ("Observation", ["read", "search-type"]),
    ]
    assert [i.code for i in rest.interaction] == ["transaction", "batch"]
    assert not rest.operation and not rest.searchParam
