"""What a notification says, in each channel's format: the minimum a clinician needs to act.

Finding, probability, side or slices, lane, accession, patient location, time since the
scan, a link to the study on the operator page and an acknowledgement link. Never the
patient's name or birth date: the alert does not carry them, and a message that leaves
the hospital's systems (a Teams or Slack tenant, a mailbox) should carry no more than
the accession number a radiologist opens the study by.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from typing import Any
from urllib.parse import quote

from schemas.alerts import Alert


@dataclass(frozen=True)
class Notice:
    alert: Alert
    step: int
    recipient: str
    recipient_display: str
    key: str
    study_url: str
    ack_url: str
    fallback: bool = False
    # The alert's patient class; "" (not known when routed) is shown as "unknown".
    location: str = ""
    # notify.omit: what this hospital leaves out (minimum necessary).
    omit: frozenset[str] = frozenset()


def study_url(public_url: str, study_uid: str) -> str:
    return f"{public_url.rstrip('/')}/operator/studies/{quote(study_uid, safe='')}"


def ack_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/notify/ack?t={quote(token, safe='')}"


def _ago(then: datetime, now: datetime) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def title(n: Notice) -> str:
    prefix = "UNACKNOWLEDGED - " if n.step > 0 else ""
    a = n.alert
    which = "" if "accession" in n.omit else f" accession {a.accession_number or '?'}"
    return f"{prefix}Suspected {a.finding} ({a.lane.upper()}){which}"


def facts(n: Notice, now: datetime) -> list[tuple[str, str]]:
    a = n.alert
    finding = a.finding
    if "probability" not in n.omit:
        finding += f" (probability {a.probability:.2f}, threshold {a.threshold:.2f})"
    rows = [("Finding", finding), ("Lane", a.lane)]
    if "accession" not in n.omit:
        rows.append(("Accession", a.accession_number or "unknown"))
    if "location" not in n.omit:
        rows.append(("Patient location", n.location or "unknown"))
    if "since_scan" not in n.omit:
        rows.append(("Since scan", _ago(a.received_at, now)))
    if a.laterality is not None and "side" not in n.omit:
        rows.insert(1, ("Side", a.laterality))
    if a.slice_range is not None and "slices" not in n.omit:
        s = a.slice_range
        where = (
            f"images {s.first_instance_number}-{s.last_instance_number}"
            if s.first_instance_number is not None
            else f"z {s.first_position_mm:.0f} to {s.last_position_mm:.0f} mm"
        )
        rows.insert(1, ("Slices", f"{where} ({s.slices} slices)"))
    rows.append(("Escalation", "fallback" if n.fallback else f"step {n.step + 1}, {n.recipient_display}"))
    return rows


# JSON fields each omittable item removes (set to null: receivers see the same keys).
_JSON_OMIT = {
    "accession": ("accession_number",),
    "probability": ("probability", "threshold"),
    "side": ("laterality",),
    "slices": ("slice_range",),
    "location": ("patient_location",),
    "since_scan": ("received_at", "ready_at", "seconds_since_scan"),
}


def json_body(n: Notice, now: datetime) -> dict[str, Any]:
    body = _json_body(n, now)
    for item in n.omit:
        for name in _JSON_OMIT.get(item, ()):
            body[name] = None
    return body


def _json_body(n: Notice, now: datetime) -> dict[str, Any]:
    a = n.alert
    return {
        "type": "radtriage.alert",
        "idempotency_key": n.key,
        "alert_id": a.alert_id,
        "study_uid": a.study_uid,
        "accession_number": a.accession_number,
        "finding": a.finding,
        "probability": a.probability,
        "threshold": a.threshold,
        "lane": a.lane,
        "laterality": a.laterality,
        "slice_range": a.slice_range.model_dump() if a.slice_range is not None else None,
        "patient_location": n.location or None,
        "received_at": a.received_at.isoformat(),
        "ready_at": a.ready_at.isoformat(),
        "alerted_at": a.alerted_at.isoformat(),
        "seconds_since_scan": max(0.0, (now - a.received_at).total_seconds()),
        "step": n.step,
        "fallback": n.fallback,
        "recipient": n.recipient,
        "study_url": n.study_url,
        "ack_url": n.ack_url or None,
        "title": title(n),
    }


def slack_body(n: Notice, now: datetime) -> dict[str, Any]:
    """Slack incoming webhook: a fallback `text` and Block Kit sections."""
    lines = "\n".join(f"*{k}:* {v}" for k, v in facts(n, now))
    links = f"<{n.study_url}|Open the study>" + (f"  |  <{n.ack_url}|Acknowledge>" if n.ack_url else "")
    return {
        "text": title(n),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": title(n)[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": lines}},
            {"type": "section", "text": {"type": "mrkdwn", "text": links}},
        ],
    }


def teams_body(n: Notice, now: datetime) -> dict[str, Any]:
    """Teams incoming webhook (Workflows or a connector): an Adaptive Card in a message."""
    actions = [{"type": "Action.OpenUrl", "title": "Open the study", "url": n.study_url}]
    if n.ack_url:
        actions.append({"type": "Action.OpenUrl", "title": "Acknowledge", "url": n.ack_url})
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {"type": "TextBlock", "text": title(n), "weight": "Bolder", "size": "Medium", "wrap": True},
            {"type": "FactSet", "facts": [{"title": k, "value": v} for k, v in facts(n, now)]},
        ],
        "actions": actions,
    }
    return {
        "type": "message",
        "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "content": card}],
    }


def email(n: Notice, now: datetime, sender: str, to: str) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = title(n)
    msg["From"] = sender
    msg["To"] = to
    # The idempotency key as the Message-ID: a re-sent copy is recognisably the same mail.
    msg["Message-ID"] = f"<{n.key}@radtriage>"
    body = [f"{k}: {v}" for k, v in facts(n, now)]
    body += ["", f"Open the study: {n.study_url}"]
    if n.ack_url:
        body.append(f"Acknowledge: {n.ack_url}")
    body += ["", "radtriage suggestion for triage only; the images are the diagnosis."]
    msg.set_content("\n".join(body) + "\n")
    return msg
