"""The STOW-RS response (PS3.18 10.5.3): status code and DICOM JSON body (pure).

- 200: every instance stored;
- 202: some stored, some failed (FailedSOPSequence says which and why);
- 409: none stored, for reasons in the request (bad objects, wrong study...);
- 503 (with Retry-After): none stored and every failure was ours (Kafka or the blob
  store out of resources) — the same instances will succeed later.
FailureReason (0008,1197) carries the C-STORE status radtriage would have answered
(connectors/dicom/validation.py); each failed item also carries the reason in words in
ErrorComment (0000,0902), at most 64 characters and never a value from the dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from connectors.dicom import validation as v

DICOM_JSON = "application/dicom+json"
RETRY_AFTER_S = 5


@dataclass(frozen=True)
class Stored:
    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Failed:
    sop_class_uid: str
    sop_instance_uid: str
    status: int
    reason: str


def out_of_resources(status: int) -> bool:
    """PS3.4: 0xA7xx is 'Refused: Out of Resources', the family a sender retries."""
    return status & 0xFF00 == 0xA700


def http_status(stored: Sequence[Stored], failed: Sequence[Failed]) -> int:
    if not failed:
        return 200
    if stored:
        return 202
    if all(out_of_resources(f.status) for f in failed):
        return 503
    return 409


def study_url(base_url: str, study_uid: str) -> str:
    return f"{base_url}/dicomweb/studies/{study_uid}"


def instance_url(base_url: str, s: Stored) -> str:
    return f"{study_url(base_url, s.study_uid)}/series/{s.series_uid}/instances/{s.sop_instance_uid}"


def _ui(uid: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [uid]} if uid else {"vr": "UI"}


def stow_response(
    stored: Sequence[Stored], failed: Sequence[Failed], *, base_url: str, target_study: str | None = None
) -> dict[str, Any]:
    """The response dataset in DICOM JSON (PS3.18 F.2)."""
    body: dict[str, Any] = {}
    studies = {s.study_uid for s in stored}
    # The study's URL when the request named one, or when everything stored is one study.
    study = target_study if target_study else (next(iter(studies)) if len(studies) == 1 else None)
    if study and stored:
        body["00081190"] = {"vr": "UR", "Value": [study_url(base_url, study)]}
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00000902": {"vr": "LO", "Value": [f.reason[: v.MAX_COMMENT]]},
                    "00081150": _ui(f.sop_class_uid),
                    "00081155": _ui(f.sop_instance_uid),
                    "00081197": {"vr": "US", "Value": [f.status]},
                }
                for f in failed
            ],
        }
    if stored:
        body["00081199"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": _ui(s.sop_class_uid),
                    "00081155": _ui(s.sop_instance_uid),
                    "00081190": {"vr": "UR", "Value": [instance_url(base_url, s)]},
                }
                for s in stored
            ],
        }
    return body
