"""The acknowledgement link of a notification: `/notify/ack?t=<token>`.

The token (processors/notify/signing.py) is the credential: signed with
`notify.ack_secret`, it names one alert and expires, so the path is public (no bearer
token: a phone opening a link from a Teams card or a mail has none).

GET shows what is acknowledged and a button; only the POST that button sends records it.
A GET must not: mail gateways and chat clients open links to preview or scan them, and
each would otherwise acknowledge the alert for a person who never saw it.

The record is the operator page's (radtriage/operator/actions.py `ack_event`): stage
"alert", decision ACK_DECISION with who and when, on `triage.audit`, answered only once
Kafka has it (acks=all); the notify stage reads it and stops the escalation.
"""

from __future__ import annotations

import html
import logging
import time
import unicodedata

from aiohttp import web

from connectors.http.middleware import HttpError
from connectors.http.state import PUBLISHER, SETTINGS
from connectors.publisher import PublishError
from processors.notify.signing import AckClaim, AckTokenError, read_ack_token
from radtriage.telemetry import headers_for_current_span
from schemas.audit import ACK_DECISION, AuditEvent
from schemas.base import utcnow

log = logging.getLogger(__name__)

PATH = "/notify/ack"
MAX_NAME = 64
_PROBLEMS = {
    "malformed": "This acknowledgement link is damaged; open the study from the message instead.",
    "bad_signature": "This acknowledgement link is not valid.",
    "expired": "This acknowledgement link has expired; acknowledge on the operator page.",
}


def _page(title: str, body: str, status: int = 200) -> web.Response:
    text = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title></head><body style='font-family:sans-serif;max-width:40em'>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return web.Response(
        text=text, status=status, content_type="text/html", headers={"Cache-Control": "no-store"}
    )


def clean_name(value: str) -> str:
    """Who acknowledges: a short printable name (staff, never a patient)."""
    name = " ".join(value.split())[:MAX_NAME]
    if not name or any(unicodedata.category(ch).startswith("C") for ch in name):
        raise ValueError("say who acknowledges (your name or initials)")
    return name


def ack_record(claim: AckClaim, by: str) -> AuditEvent:
    """The same record as the operator page's button, plus how it came."""
    at = utcnow()
    return AuditEvent(
        study_uid=claim.study_uid,
        accession_number=claim.accession_number,
        stage="alert",
        decision=ACK_DECISION,
        detail={
            "alert_id": claim.alert_id,
            "by": by,
            "at": at.isoformat(),
            "finding": claim.finding,
            "via": "notification_link",
            "recipient": claim.recipient,
            "step": claim.step,
        },
        at=at,
    )


def _claim(request: web.Request, token: str) -> AckClaim:
    secret = request.app[SETTINGS].notify.ack_secret.get_secret_value()
    if not secret:
        raise HttpError(404, "acknowledgement links are not enabled")
    try:
        return read_ack_token(secret, token, time.time())
    except AckTokenError as exc:
        log.info("acknowledgement link refused: %s", exc.problem)
        raise _Refused(exc.problem) from None


class _Refused(Exception):
    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _refusal(problem: str) -> web.Response:
    status = 410 if problem == "expired" else 400
    return _page("Not acknowledged", f"<p>{html.escape(_PROBLEMS.get(problem, problem))}</p>", status)


async def confirm(request: web.Request) -> web.Response:
    token = request.query.get("t", "")
    try:
        claim = _claim(request, token)
    except _Refused as exc:
        return _refusal(exc.problem)
    form = (
        f"<p>Suspected <b>{html.escape(claim.finding)}</b>, accession "
        f"<b>{html.escape(claim.accession_number or 'unknown')}</b>.</p>"
        f"<form method='post' action='{PATH}'>"
        f"<input type='hidden' name='t' value='{html.escape(token, quote=True)}'>"
        f"<label>Your name <input name='by' required maxlength='{MAX_NAME}' "
        f"value='{html.escape(claim.recipient, quote=True)}'></label> "
        "<button type='submit'>Acknowledge</button></form>"
    )
    return _page("Acknowledge this alert?", form)


async def acknowledge(request: web.Request) -> web.Response:
    form = await request.post()
    token, by = form.get("t"), form.get("by")
    if not isinstance(token, str) or not isinstance(by, str):
        raise HttpError(400, "send the form's fields t and by")
    try:
        claim = _claim(request, token)
    except _Refused as exc:
        return _refusal(exc.problem)
    try:
        name = clean_name(by)
    except ValueError as exc:
        return _page("Not acknowledged", f"<p>{html.escape(str(exc))}</p>", 400)
    event = ack_record(claim, name)
    settings = request.app[SETTINGS]
    headers = {k: v.decode() for k, v in headers_for_current_span()}
    try:
        meta = await request.app[PUBLISHER].publish(settings.topics.audit, claim.study_uid, event, headers)
    except PublishError:
        return _page(
            "Not acknowledged", "<p>The event log is unavailable: nothing was recorded. Try again.</p>", 503
        )
    log.info("alert %s acknowledged by link (audit %s:%s)", claim.alert_id, meta.partition, meta.offset)
    study = f"/operator/studies/{claim.study_uid}"
    return _page(
        "Acknowledged",
        f"<p>Acknowledged by {html.escape(name)} at {html.escape(event.at.isoformat())}. "
        "No one further will be notified of this alert.</p>"
        f"<p><a href='{html.escape(study, quote=True)}'>Open the study</a></p>",
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get(PATH, confirm)
    app.router.add_post(PATH, acknowledge)
