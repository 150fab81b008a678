"""The hospital messages `radtriage demo` sends around its images: HL7 v2 orders and ADT over
MLLP (python-hl7's MLLP client), and FHIR R4 ServiceRequests over HTTP.

Synthetic patients only; the messages look like what a RIS or EHR sends, so the demo
exercises the same listeners an interface engineer points real systems at.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from connectors.http.tls import TlsConfigError, client_context
from connectors.http.tokens import TokenError, client_token
from radtriage.settings import Settings


class MessageError(RuntimeError):
    """A listener refused a demo message or could not be reached."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S")


def hl7_order(accession: str, patient_id: str, *, priority: str, indication: str) -> str:
    """An ORM^O01 (HL7 2.3) for a non-contrast head CT: priority in ORC-7 and OBR-27
    (S/A/R), accession in OBR-18, reason for study in OBR-31, emergency patient in PV1-2."""
    ts = _now()
    tq = f"^^^{ts}^^{priority}"
    obr = ["OBR", "1", f"P{accession}", f"F{accession}", "CTHEADWO^CT HEAD WO CONTRAST^L", "", ts]
    obr += [""] * 11 + [accession] + [""] * 8 + [tq] + [""] * 3 + [f"^{indication}"]
    segments = [
        f"MSH|^~\\&|DEMO_RIS|DEMO_HOSP|RADTRIAGE|DEMO_HOSP|{ts}||ORM^O01|ORM{accession}|P|2.3",
        f"PID|1||{patient_id}^^^DEMO_HOSP^MR||Phantom^Demo||19700101|O",
        "PV1|1|E|ED^01^01",
        f"ORC|NW|P{accession}|F{accession}||SC||{tq}",
        "|".join(obr),
    ]
    return "\r".join(segments) + "\r"


def hl7_adt(patient_id: str, *, patient_class: str) -> str:
    """An ADT^A04 (register a patient) with the patient class in PV1-2 (E/I/O)."""
    ts = _now()
    segments = [
        f"MSH|^~\\&|DEMO_ADT|DEMO_HOSP|RADTRIAGE|DEMO_HOSP|{ts}||ADT^A04|ADT{patient_id}{ts}|P|2.3",
        f"EVN|A04|{ts}",
        f"PID|1||{patient_id}^^^DEMO_HOSP^MR||Phantom^Demo||19700101|O",
        f"PV1|1|{patient_class}|CLINIC^01^01",
    ]
    return "\r".join(segments) + "\r"


def send_hl7(settings: Settings, message: str, host: str = "127.0.0.1") -> str:
    """Send one message over MLLP and return its ACK; a non-AA/CA acknowledgement is an error."""
    from hl7.client import MLLPClient

    try:
        with MLLPClient(host, settings.hl7.port) as client:
            ack = client.send_message(message)
    except OSError as exc:
        raise MessageError(f"HL7 listener {host}:{settings.hl7.port} unreachable: {exc}") from exc
    text = ack.decode("utf-8", errors="replace") if isinstance(ack, bytes) else str(ack)
    msa = next((seg for seg in text.replace("\n", "\r").split("\r") if seg.startswith("MSA")), "")
    code = msa.split("|")[1] if msa.count("|") >= 1 else ""
    if code not in ("AA", "CA"):
        raise MessageError(f"HL7 listener answered {msa or text[:200]!r}")
    return text


def service_request(accession: str, patient_id: str, *, priority: str, reason: str = "") -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "priority": priority,
        "identifier": [
            {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
                },
                "value": accession,
            }
        ],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "30799-1", "display": "CT Head WO contrast"}],
            "text": "CT HEAD WO CONTRAST",
        },
        "subject": {"identifier": {"value": patient_id}},
    }
    if reason:
        resource["reasonCode"] = [{"text": reason}]
    return resource


def post_fhir(settings: Settings, resource: dict[str, Any], host: str = "127.0.0.1") -> str:
    """POST a resource to the FHIR intake; returns the Location of the created resource."""
    http = settings.http
    url = f"{http.scheme}://{host}:{http.port}/fhir/{resource['resourceType']}"
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    try:
        # The same settings as the server: its certificate and one of its tokens.
        context = client_context(http) if http.tls.enabled else None
        token = client_token(http.auth.tokens, http.auth.tokens_file) if http.auth.mode != "off" else None
    except (TlsConfigError, TokenError) as exc:
        raise MessageError(f"cannot reach the FHIR intake securely: {exc}") from exc
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(resource).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return str(response.headers.get("Location", ""))
    except urllib.error.HTTPError as exc:
        raise MessageError(f"FHIR intake answered {exc.code}: {exc.read()[:300]!r}") from exc
    except OSError as exc:
        raise MessageError(f"FHIR intake {url} unreachable: {exc}") from exc
