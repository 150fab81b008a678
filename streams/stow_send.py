"""STOW-RS of one object to one DICOMweb service (aiohttp), and what its answer means for a retry.

`POST {url}/studies` with `multipart/related; type="application/dicom"`, one Part 10 object
per request (the pacs-export stage audits and retries per object). The answer (PS3.18
10.5.3, Table 10.5.3-1) decides:

- 200: stored; 202 with the instance in ReferencedSOPSequence: stored with a warning
  (WarningReason, e.g. 0xB000 coercion); 202 or 409 with it in FailedSOPSequence: not
  stored, with the FailureReason (Out of Resources 0xA7xx may succeed later, any other
  reason is final); 409 without one: final;
- 408 Request Timeout, 429 Too Many Requests, any 5xx, no answer at all (refused, reset,
  timeout, TLS failure): retried to the deadline;
- any other 4xx (400, 401 / 403 a wrong credential, 404 a wrong URL, 413, 415) and a
  redirect (not followed: the configured URL is wrong): final, dead-lettered with it.

Authorization: a bearer token or HTTP basic from the destination (SecretStr, never logged).
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import uuid
from dataclasses import dataclass

import aiohttp
from pydicom.dataset import Dataset

from processors.dicom_results import encode
from radtriage.settings import StowDestination

# The JSON answer of one object is a few hundred bytes; a service answering more is cut here.
MAX_ANSWER_BYTES = 1 << 20
OUT_OF_RESOURCES = 0xA700
RETRYABLE_HTTP = frozenset({408, 429})

# DICOM JSON keywords of the STOW-RS response (PS3.18 Table 10.5.3-2).
_FAILED = "00081198"  # FailedSOPSequence
_REFERENCED = "00081199"  # ReferencedSOPSequence
_SOP_INSTANCE = "00081155"  # ReferencedSOPInstanceUID
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


@dataclass(frozen=True)
class StowOutcome:
    # The HTTP status; None when no answer came.
    http_status: int | None
    # The instance's FailureReason (failed) or WarningReason (stored) when the service named one.
    reason: int | None
    # What happened, for the audit trail and a dead letter.
    detail: str
    stored: bool

    @property
    def retryable(self) -> bool:
        if self.stored:
            return False
        if self.http_status is None or self.http_status >= 500 or self.http_status in RETRYABLE_HTTP:
            return True
        return self.reason is not None and (self.reason & 0xFF00) == OUT_OF_RESOURCES

    @property
    def status_text(self) -> str:
        if self.http_status is None:
            return "no response"
        if self.reason is None:
            return f"HTTP {self.http_status}"
        return (
            f"HTTP {self.http_status} ({'Warning' if self.stored else 'Failure'}Reason 0x{self.reason:04X})"
        )


def _items(answer: dict[str, object], tag: str) -> list[dict[str, object]]:
    element = answer.get(tag)
    values = element.get("Value", []) if isinstance(element, dict) else []
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


def _first(item: dict[str, object], tag: str) -> object | None:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _reason(item: dict[str, object], tag: str) -> int | None:
    value = _first(item, tag)
    return value if isinstance(value, int) else None


def parse_answer(body: bytes) -> dict[str, object]:
    """The DICOM JSON of a STOW-RS answer ({} when there is none or it is not DICOM JSON:
    the HTTP status alone then decides). A list of one dataset is taken as that dataset."""
    try:
        answer = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    return answer if isinstance(answer, dict) else {}


def outcome_of(http_status: int, body: bytes, sop_instance_uid: str, phrase: str = "") -> StowOutcome:
    """The outcome of one object's STOW-RS answer (pure); `phrase`: the HTTP reason phrase."""
    answer = parse_answer(body)
    failed = [i for i in _items(answer, _FAILED) if _first(i, _SOP_INSTANCE) == sop_instance_uid]
    referenced = [i for i in _items(answer, _REFERENCED) if _first(i, _SOP_INSTANCE) == sop_instance_uid]
    if failed:
        reason = _reason(failed[0], _FAILURE_REASON)
        return StowOutcome(http_status, reason, "refused: the instance is in FailedSOPSequence", False)
    if http_status == 200:
        return StowOutcome(200, None, "stored", True)
    if http_status == 202:
        if referenced:
            warning = _reason(referenced[0], _WARNING_REASON)
            return StowOutcome(202, warning, "stored with warning", True)
        return StowOutcome(202, None, "accepted in part, the instance not named as stored", False)
    if http_status == 409:
        return StowOutcome(409, None, "conflict: the service refused the instance", False)
    if 300 <= http_status < 400:
        return StowOutcome(http_status, None, "redirected (not followed: check the destination's url)", False)
    text = body[:200].decode("utf-8", errors="replace").strip() or phrase
    return StowOutcome(http_status, None, f"refused{': ' + text if text else ''}", False)


def multipart(payload: bytes) -> tuple[bytes, str]:
    """One Part 10 object as a multipart/related body, and its Content-Type."""
    boundary = f"radtriage-{uuid.uuid4().hex}"
    body = b"".join(
        (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
            payload,
            f"\r\n--{boundary}--\r\n".encode(),
        )
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def auth_headers(destination: StowDestination) -> dict[str, str]:
    if destination.bearer_token is not None:
        return {"Authorization": f"Bearer {destination.bearer_token.get_secret_value()}"}
    if destination.username is not None and destination.password is not None:
        pair = f"{destination.username}:{destination.password.get_secret_value()}".encode()
        return {"Authorization": f"Basic {base64.b64encode(pair).decode('ascii')}"}
    return {}


def ssl_option(destination: StowDestination) -> ssl.SSLContext | bool:
    """aiohttp's `ssl=`: the service verified (against `ca_file` if given), or not at all."""
    if not destination.tls_verify:
        return False
    if destination.ca_file is None:
        return True
    context = ssl.create_default_context(cafile=str(destination.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def stow(destination: StowDestination, ds: Dataset, timeout_s: float) -> StowOutcome:
    """STOW-RS `ds` to `destination`; never raises for a network or HTTP failure."""
    # Encoding a key image is some ms of CPU: off the event loop.
    body, content_type = multipart(await asyncio.to_thread(encode, ds))
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"} | auth_headers(destination)
    try:
        tls = ssl_option(destination)
    except (OSError, ValueError) as exc:  # an unreadable CA file: fix, then replay
        return StowOutcome(None, None, f"TLS configuration: {type(exc).__name__}: {exc}", False)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.post(
                f"{destination.url.rstrip('/')}/studies",
                data=body,
                headers=headers,
                ssl=tls,
                allow_redirects=False,
            ) as response,
        ):
            answer = await response.content.read(MAX_ANSWER_BYTES)
            return outcome_of(response.status, answer, str(ds.SOPInstanceUID), response.reason or "")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        why = f"no answer from {destination.url}: {type(exc).__name__}: {exc}"
        return StowOutcome(None, None, why, False)
