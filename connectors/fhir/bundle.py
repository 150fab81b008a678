"""Transaction and batch Bundles posted to `POST /fhir`: plan and answer (pure).

`plan_bundle` validates the envelope and every entry before anything is published:
each entry becomes either an accepted OrderEvent or the FhirError it would get on its
own. The route then publishes (transaction: only if every entry was accepted; batch:
every accepted entry) and `response_bundle` answers with a transaction-response or
batch-response Bundle, one response per entry in order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from connectors.fhir.mapping import accept
from connectors.fhir.outcome import FhirError, Issue, error, operation_outcome
from connectors.fhir.parsing import SUPPORTED_TYPES, json_depth_exceeds
from schemas.orders import OrderEvent

BundleKind = Literal["transaction", "batch"]

_RESOURCE_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]{1,63}$")

REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    422: "Unprocessable Entity",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Accepted:
    resource_type: str
    resource_id: str
    event: OrderEvent


EntryResult = Accepted | FhirError


@dataclass(frozen=True)
class BundlePlan:
    kind: BundleKind
    entries: list[EntryResult]

    def refusal(self) -> FhirError | None:
        """For a transaction: the whole Bundle's refusal if any entry failed, naming each."""
        failed = [e for e in self.entries if isinstance(e, FhirError)]
        if not failed:
            return None
        issues = [issue for f in failed for issue in f.issues]
        statuses = {f.status for f in failed}
        # One status for the whole Bundle: the entries' own if they agree, else 400.
        return FhirError(statuses.pop() if len(statuses) == 1 else 400, issues)


def _envelope_issues(exc: ValidationError) -> list[Issue]:
    issues = []
    for err in exc.errors(include_input=False, include_url=False):
        where = "Bundle" + "".join(
            f"[{p}]" if isinstance(p, int) else f".{str(p).removesuffix('__ext')}" for p in err["loc"]
        )
        issues.append(Issue("structure", f"{where}: {' '.join(str(err['msg']).split())}", (where,)))
    return issues


def _check_envelope(data: Any) -> tuple[BundleKind, list[Mapping[str, Any]]]:
    if not isinstance(data, Mapping) or data.get("resourceType") != "Bundle":
        raise error(
            400,
            "invalid",
            "POST [base] takes a Bundle of type transaction or batch; to create one resource, "
            "POST it to [base]/<resourceType>",
            "Bundle",
        )
    kind = data.get("type")
    if kind not in ("transaction", "batch"):
        raise error(400, "invalid", "Bundle.type must be 'transaction' or 'batch'", "Bundle.type")
    entries = data.get("entry", [])
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise error(400, "structure", "Bundle.entry must be an array of objects", "Bundle.entry")
    # The envelope is validated without the entries' resources: those are validated one
    # by one below, so a batch can answer each entry on its own.
    shell = {**data, "entry": [{k: v for k, v in e.items() if k != "resource"} for e in entries]}
    if not entries:
        shell.pop("entry")
    if json_depth_exceeds(shell):
        raise error(400, "structure", "Bundle nested too deeply", "Bundle")
    try:
        Bundle.model_validate(shell)
    except ValidationError as exc:
        raise FhirError(400, _envelope_issues(exc)) from None
    except Exception as exc:  # fhir.resources raises other types on odd input
        raise error(400, "structure", f"Bundle is not valid ({type(exc).__name__})", "Bundle") from None
    return kind, list(entries)


def _plan_entry(index: int, entry: Mapping[str, Any], new_id: Callable[[], str]) -> EntryResult:
    where = f"Bundle.entry[{index}]"
    request = entry.get("request")
    if not isinstance(request, Mapping):
        return error(
            400, "required", f"{where}.request is required in a transaction or batch", f"{where}.request"
        )
    method = request.get("method")
    if method != "POST":
        return error(
            405,
            "not-supported",
            f"{where}.request.method {str(method)[:16]!r} not supported: only POST (create)",
            f"{where}.request.method",
        )
    url = str(request.get("url") or "").strip("/")
    if url not in SUPPORTED_TYPES:
        if _RESOURCE_TYPE_NAME.match(url):
            return error(
                404,
                "not-supported",
                f"{where}.request.url: resource type {url!r} not supported "
                f"(only {', '.join(SUPPORTED_TYPES)})",
                f"{where}.request.url",
            )
        return error(
            400,
            "invalid",
            f"{where}.request.url must name the resource type to create (e.g. 'ServiceRequest')",
            f"{where}.request.url",
        )
    if "resource" not in entry:
        return error(400, "required", f"{where}.resource is required for POST", f"{where}.resource")
    resource_id = new_id()
    try:
        event = accept(entry["resource"], url, resource_id=resource_id, where=f"{where}.resource")
    except FhirError as exc:
        return exc
    return Accepted(url, resource_id, event)


def plan_bundle(data: Any, new_id: Callable[[], str]) -> BundlePlan:
    """Validate a posted Bundle; raises FhirError (400) only for a broken envelope."""
    kind, entries = _check_envelope(data)
    return BundlePlan(kind, [_plan_entry(i, e, new_id) for i, e in enumerate(entries)])


def history_location(base_url: str, resource_type: str, resource_id: str) -> str:
    """Where a created resource 'is': version 1 of it (FHIR create's Location)."""
    return f"{base_url}/fhir/{resource_type}/{resource_id}/_history/1"


def response_bundle(
    kind: BundleKind, results: Sequence[EntryResult], *, base_url: str, now: datetime
) -> dict[str, Any]:
    """The transaction-response / batch-response for `results` (one per entry, in order)."""
    entries: list[dict[str, Any]] = []
    for result in results:
        if isinstance(result, Accepted):
            entries.append(
                {
                    "response": {
                        "status": "201 Created",
                        "location": history_location(base_url, result.resource_type, result.resource_id),
                        "etag": 'W/"1"',
                        "lastModified": now.isoformat(),
                    }
                }
            )
        else:
            entries.append(
                {
                    "response": {
                        "status": f"{result.status} {REASONS.get(result.status, '')}".strip(),
                        "outcome": operation_outcome(result.issues),
                    }
                }
            )
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": f"{kind}-response"}
    if entries:
        bundle["entry"] = entries
    return bundle
