"""STOW-RS to a destination: what an answer means (stored, retried, final), the request's
body and credentials, and the destination's settings (pure functions; the real DICOMweb
peer is in tests/integration/test_pacs_export.py)."""

from __future__ import annotations

import base64
import json
from email import message_from_bytes

import pytest
from pydantic import ValidationError

from radtriage.settings import DicomDestination, DispatchSettings, StowDestination
from streams.stow_send import auth_headers, multipart, outcome_of, parse_answer

UID = "2.25.1234"
OTHER = "2.25.999"


def _answer(failed: dict[str, int] | None = None, referenced: dict[str, int | None] | None = None) -> bytes:
    """A DICOM JSON STOW-RS answer: FailedSOPSequence (uid -> FailureReason) and
    ReferencedSOPSequence (uid -> WarningReason or none)."""
    body: dict[str, object] = {}
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [
                {"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [r]}}
                for u, r in failed.items()
            ],
        }
    if referenced:
        items = []
        for u, w in referenced.items():
            item: dict[str, object] = {"00081155": {"vr": "UI", "Value": [u]}}
            if w is not None:
                item["00081196"] = {"vr": "US", "Value": [w]}
            items.append(item)
        body["00081199"] = {"vr": "SQ", "Value": items}
    return json.dumps(body).encode()


def test_200_is_stored() -> None:
    outcome = outcome_of(200, _answer(referenced={UID: None}), UID)
    assert outcome.stored and not outcome.retryable and outcome.status_text == "HTTP 200"


def test_202_with_the_instance_referenced_is_stored_with_its_warning() -> None:
    outcome = outcome_of(202, _answer(referenced={UID: 0xB000}, failed={OTHER: 0xA900}), UID)
    assert outcome.stored and outcome.status_text == "HTTP 202 (WarningReason 0xB000)"


def test_202_with_the_instance_failed_is_final_unless_out_of_resources() -> None:
    final = outcome_of(202, _answer(failed={UID: 0xA900}, referenced={OTHER: None}), UID)
    assert not final.stored and not final.retryable
    assert final.status_text == "HTTP 202 (FailureReason 0xA900)"
    busy = outcome_of(202, _answer(failed={UID: 0xA700}), UID)
    assert not busy.stored and busy.retryable


def test_202_naming_neither_is_not_taken_as_stored() -> None:
    outcome = outcome_of(202, _answer(referenced={OTHER: None}), UID)
    assert not outcome.stored and not outcome.retryable


def test_409_is_final_with_its_failure_reason() -> None:
    outcome = outcome_of(409, _answer(failed={UID: 0x0110}), UID)
    assert not outcome.stored and not outcome.retryable
    assert outcome.status_text == "HTTP 409 (FailureReason 0x0110)"
    bare = outcome_of(409, b"", UID)
    assert not bare.stored and not bare.retryable and bare.status_text == "HTTP 409"


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_server_errors_timeouts_and_throttling_are_retried(status: int) -> None:
    outcome = outcome_of(status, b"busy", UID)
    assert not outcome.stored and outcome.retryable


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 415, 301, 307])
def test_other_client_errors_and_redirects_are_final(status: int) -> None:
    outcome = outcome_of(status, b"", UID, "Unauthorized")
    assert not outcome.stored and not outcome.retryable
    assert outcome.status_text == f"HTTP {status}"


def test_a_401_names_the_reason_phrase() -> None:
    assert outcome_of(401, b"", UID, "Unauthorized").detail == "refused: Unauthorized"


def test_an_answer_that_is_not_dicom_json_leaves_the_status_to_decide() -> None:
    assert parse_answer(b"<html>oops</html>") == {}
    assert parse_answer(b"[1, 2]") == {}
    assert outcome_of(200, b"<html>oops</html>", UID).stored
    # A list of one dataset (some services answer so) is that dataset.
    listed = b"[" + _answer(failed={UID: 0xC000}) + b"]"
    assert not outcome_of(200, listed, UID).stored


def test_the_body_is_one_application_dicom_part() -> None:
    payload = b"\x00" * 128 + b"DICM" + b"\r\n--not-a-boundary\r\n"
    body, content_type = multipart(payload)
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    message = message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    (part,) = message.get_payload()
    assert part.get_content_type() == "application/dicom"
    assert part.get_payload(decode=True) == payload


def test_credentials() -> None:
    base = {"name": "w", "kind": "stow", "url": "https://pacs.example/dicom-web"}
    assert auth_headers(StowDestination.model_validate(base)) == {}
    bearer = StowDestination.model_validate(base | {"bearer_token": "t0k"})
    assert auth_headers(bearer) == {"Authorization": "Bearer t0k"}
    assert "t0k" not in repr(bearer)
    basic = StowDestination.model_validate(base | {"username": "rad", "password": "pw"})
    (value,) = auth_headers(basic).values()
    assert base64.b64decode(value.removeprefix("Basic ")) == b"rad:pw"


def test_destination_settings() -> None:
    dispatch = DispatchSettings.model_validate(
        {
            "destinations": [
                {"name": "pacs", "host": "pacs", "ae_title": "PACS"},
                {"name": "web", "kind": "stow", "url": "http://pacs:8042/dicom-web", "objects": ["sr"]},
            ]
        }
    )
    dicom, web = dispatch.destinations
    assert isinstance(dicom, DicomDestination) and dicom.where == "PACS@pacs:104"
    assert isinstance(web, StowDestination) and web.where == "http://pacs:8042/dicom-web"
    base = {"name": "w", "kind": "stow", "url": "https://pacs/dicom-web"}
    for bad in (
        {"url": "ftp://pacs/x"},
        {"username": "rad"},
        {"bearer_token": "t", "username": "rad", "password": "pw"},
        {"host": "pacs"},  # a C-STORE field on a STOW destination
    ):
        with pytest.raises(ValidationError):
            DispatchSettings.model_validate({"destinations": [base | bad]})
    with pytest.raises(ValidationError):
        DispatchSettings.model_validate({"destinations": [{"name": "x", "kind": "ftp", "url": "http://a"}]})


def test_a_child_of_up_inherits_the_credentials_a_dump_masks_them() -> None:
    from radtriage.settings import Settings

    web = {"name": "w", "kind": "stow", "url": "https://pacs/dicom-web", "bearer_token": "t0k"}
    settings = Settings.model_validate({"dispatch": {"destinations": [web]}})
    assert "t0k" not in settings.model_dump_json()
    (inherited,) = Settings.model_validate_json(settings.inheritable_json()).dispatch.destinations
    assert isinstance(inherited, StowDestination) and inherited.bearer_token is not None
    assert inherited.bearer_token.get_secret_value() == "t0k"
