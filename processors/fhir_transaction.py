"""A report Bundle as a FHIR transaction an EHR's server can apply any number of times.

radtriage's report (processors/fhir_report.py) is a `collection` Bundle whose resources
have ids radtriage derived from the study and finding (the same for a re-run, so an amended
report has the id of the one it amends). A FHIR server owns its own ids, so the transaction
carries ours as an identifier instead (`urn:ietf:rfc:3986` | `urn:uuid:<id>`, the standard
way to write a URI as an identifier; the report's Observations carry it already,
processors/fhir_report.py `resource_identifier`) and every entry is conditional on it:

- the DiagnosticReport and its Observations: `PUT <type>?identifier=<ours>`, a conditional
  update: created the first time, updated afterwards (a retry, a replay: the same content
  again; an amended report: status `amended` and its new conclusion);
- the Device (the model, shared by all its reports): `POST` with `ifNoneExist`, created once.

References between entries stay `urn:uuid:` fullUrls, which the server resolves to the ids
it assigns (FHIR R4 http.html#trules). Everything here is pure: the stage sends it
(streams/fhir_sender.py) and reads the answer back with `read_outcome`/`stored_locations`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from processors.fhir_report import resource_identifier

# Created once and never changed by radtriage: the model that made the finding.
CREATE_ONCE = frozenset({"Device"})


class UnsendableBundle(ValueError):
    """The report Bundle cannot become a transaction (the message says what is missing)."""


@dataclass(frozen=True)
class ReportKey:
    """The DiagnosticReport's identifier the server finds it by."""

    system: str
    value: str

    @property
    def token(self) -> str:
        return f"{self.system}|{self.value}"


def conditional_query(key: dict[str, str]) -> str:
    """`identifier=<system>|<value>`, escaped for a URL (`|` included, `:` kept readable)."""
    return "identifier=" + quote(f"{key['system']}|{key['value']}", safe=":")


def _entry(entry: Any, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One transaction entry from a collection entry, and the identifier it is keyed on."""
    resource = entry.get("resource") if isinstance(entry, dict) else None
    if not isinstance(resource, dict):
        raise UnsendableBundle(f"entry {index} has no resource")
    kind, rid = resource.get("resourceType"), resource.get("id")
    if not isinstance(kind, str) or not kind or not isinstance(rid, str) or not rid:
        raise UnsendableBundle(f"entry {index} has no resourceType or id")
    body = copy.deepcopy(resource)
    # The server assigns its own id; ours travels as an identifier (a conditional update
    # carrying an id the server does not know would be refused by most servers).
    del body["id"]
    key = resource_identifier(rid)
    identifiers = body.setdefault("identifier", [])
    if not isinstance(identifiers, list):
        raise UnsendableBundle(f"entry {index} ({kind}) has an identifier that is not a list")
    if key not in identifiers:
        identifiers.insert(0, key)
    if kind in CREATE_ONCE:
        request = {"method": "POST", "url": kind, "ifNoneExist": conditional_query(key)}
    else:
        request = {"method": "PUT", "url": f"{kind}?{conditional_query(key)}"}
    full_url = entry.get("fullUrl") or f"urn:uuid:{rid}"
    return {"fullUrl": full_url, "resource": body, "request": request}, key


def build_transaction(bundle: dict[str, Any]) -> tuple[dict[str, Any], ReportKey]:
    """The transaction Bundle for a report Bundle, and the report's key on the server."""
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise UnsendableBundle("the Bundle has no entries")
    out: list[dict[str, Any]] = []
    report: ReportKey | None = None
    for i, entry in enumerate(entries):
        built, key = _entry(entry, i)
        if built["resource"]["resourceType"] == "DiagnosticReport":
            if report is not None:
                raise UnsendableBundle("the Bundle has more than one DiagnosticReport")
            report = ReportKey(key["system"], key["value"])
        out.append(built)
    if report is None:
        raise UnsendableBundle("the Bundle has no DiagnosticReport")
    return {"resourceType": "Bundle", "type": "transaction", "entry": out}, report


def encode(transaction: dict[str, Any]) -> bytes:
    return json.dumps(transaction, separators=(",", ":")).encode("utf-8")


def outcome_text(body: bytes, limit: int = 2000) -> str:
    """What an OperationOutcome says (severity, code, text, where), else the body's start."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("resourceType") != "OperationOutcome":
        text = body.decode("utf-8", errors="replace").strip()
        return (text[:limit] or "(empty body)") if text else "(empty body)"
    parts = []
    for issue in data.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        details = issue.get("details") if isinstance(issue.get("details"), dict) else {}
        said = issue.get("diagnostics") or (details or {}).get("text") or ""
        where = ", ".join(str(e) for e in issue.get("expression") or issue.get("location") or [])
        parts.append(
            f"{issue.get('severity', '?')} {issue.get('code', '?')}: {said}"
            + (f" (at {where})" if where else "")
        )
    return ("; ".join(parts) or "OperationOutcome without issues")[:limit]


def stored_locations(body: bytes) -> list[str]:
    """The `response.location` of each entry of a transaction-response (the server's ids,
    with their version: `DiagnosticReport/123/_history/2`)."""
    try:
        data = json.loads(body)
    except ValueError:
        return []
    if not isinstance(data, dict):
        return []
    out = []
    for entry in data.get("entry") or []:
        response = entry.get("response") if isinstance(entry, dict) else None
        if isinstance(response, dict) and isinstance(response.get("location"), str):
            out.append(response["location"])
    return out
