"""What an operators' digest says (processors/notify/digest.py), in each channel's format:
the cause, how many, over which period, and the first few (study UID, where, why) with a
link to the operator page. Dead letters carry no patient name (the page never shows one).
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from processors.notify.digest import Bucket

_WHAT = {"deadletter": "dead letter(s)", "stuck": "stuck request(s)"}


@dataclass(frozen=True)
class OpsNotice:
    bucket: Bucket
    key: str
    recipient: str
    page_url: str


def page_url(public_url: str) -> str:
    return f"{public_url.rstrip('/')}/operator"


def title(n: OpsNotice) -> str:
    b = n.bucket
    return f"radtriage: {b.count} {_WHAT[b.kind]} - {b.cause}"


def lines(n: OpsNotice) -> list[str]:
    b = n.bucket
    out = [f"{b.count} {_WHAT[b.kind]} from {b.starts:%H:%M:%S} to {b.ends:%H:%M:%S} UTC ({b.cause})"]
    out += [f"- {e.study_uid or '(no study)'}: {e.detail}" for e in b.examples]
    if b.count > len(b.examples):
        out.append(f"... and {b.count - len(b.examples)} more")
    return out


def json_body(n: OpsNotice) -> dict[str, Any]:
    b = n.bucket
    return {
        "type": f"radtriage.ops.{b.kind}",
        "idempotency_key": n.key,
        "cause": b.cause,
        "count": b.count,
        "period_start": b.starts.isoformat(),
        "period_end": b.ends.isoformat(),
        "first_at": b.first_at.isoformat() if b.first_at else None,
        "last_at": b.last_at.isoformat() if b.last_at else None,
        "examples": [
            {"study_uid": e.study_uid, "accession_number": e.accession_number, "detail": e.detail}
            for e in b.examples
        ],
        "recipient": n.recipient,
        "operator_url": n.page_url,
        "title": title(n),
    }


def slack_body(n: OpsNotice) -> dict[str, Any]:
    text = "\n".join(lines(n)) + f"\n<{n.page_url}|Open the operator page>"
    return {"text": title(n), "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]}


def teams_body(n: OpsNotice) -> dict[str, Any]:
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {"type": "TextBlock", "text": title(n), "weight": "Bolder", "wrap": True},
            *({"type": "TextBlock", "text": line, "wrap": True} for line in lines(n)),
        ],
        "actions": [{"type": "Action.OpenUrl", "title": "Open the operator page", "url": n.page_url}],
    }
    return {
        "type": "message",
        "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "content": card}],
    }


def body(n: OpsNotice, fmt: str) -> dict[str, Any]:
    return {"json": json_body, "teams": teams_body, "slack": slack_body}[fmt](n)


def email(n: OpsNotice, sender: str, to: str) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = title(n)
    msg["From"] = sender
    msg["To"] = to
    msg["Message-ID"] = f"<{n.key}@radtriage>"
    msg.set_content("\n".join([*lines(n), "", f"Operator page: {n.page_url}"]) + "\n")
    return msg
