"""FHIR OperationOutcome: how every FHIR refusal is told (pure).

A refusal is a `FhirError` (HTTP status, issues, extra headers) raised anywhere in
the FHIR path and turned into one response by the route or the server middleware.
Diagnostics go back to the sender that wrote the payload, but never into logs or
spans: they can quote what was sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

FHIR_JSON = "application/fhir+json"

Severity = Literal["fatal", "error", "warning", "information"]

# A sender that posts something badly wrong may get thousands of validation errors; the
# first few say what to fix, and the response stays small.
MAX_ISSUES = 20
MAX_DIAGNOSTICS = 500


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome.issue. `code` is from the FHIR issue-type value set
    (invalid, structure, required, value, not-supported, transient, exception...)."""

    code: str
    diagnostics: str
    expression: tuple[str, ...] = ()
    severity: Severity = "error"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": _clip(self.diagnostics),
        }
        if self.expression:
            out["expression"] = [_clip(e) for e in self.expression]
        return out


def _clip(text: str) -> str:
    return text if len(text) <= MAX_DIAGNOSTICS else text[: MAX_DIAGNOSTICS - 1] + "…"


@dataclass
class FhirError(Exception):
    """A FHIR request refused with `status` and an OperationOutcome of `issues`."""

    status: int
    issues: Sequence[Issue]
    headers: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        # Only the status and issue codes: safe to log.
        return f"HTTP {self.status}: {', '.join(sorted({i.code for i in self.issues}))}"


def error(status: int, code: str, diagnostics: str, *expression: str) -> FhirError:
    """A refusal with a single issue."""
    return FhirError(status, [Issue(code, diagnostics, tuple(expression))])


def operation_outcome(issues: Sequence[Issue]) -> dict[str, Any]:
    """An OperationOutcome resource (JSON) for `issues`, capped at MAX_ISSUES."""
    shown = list(issues[:MAX_ISSUES])
    if len(issues) > MAX_ISSUES:
        shown.append(
            Issue(
                "too-costly",
                f"{len(issues) - MAX_ISSUES} further issue(s) not listed",
                severity="warning",
            )
        )
    if not shown:  # OperationOutcome.issue is 1..*
        shown = [Issue("informational", "no issues", severity="information")]
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in shown]}


def outcome_bytes(issues: Sequence[Issue]) -> bytes:
    return json.dumps(operation_outcome(issues), ensure_ascii=False).encode()


def transient(diagnostics: str, retry_after_s: int) -> FhirError:
    """Kafka (or another dependency) did not answer in time: 503, retry later."""
    return FhirError(
        503,
        [Issue("transient", diagnostics)],
        {"Retry-After": str(retry_after_s)},
    )
