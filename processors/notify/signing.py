"""HMAC-SHA256: the signature of a webhook body and the acknowledgement link's token.

Webhook (docs/OPERATIONS.md, "Verifying a radtriage webhook"): the sender adds
`X-Radtriage-Timestamp: <unix seconds>` and `X-Radtriage-Signature: sha256=<hex>`, the HMAC
of `<timestamp>.<raw body>` under the webhook's secret. A receiver recomputes it over the
bytes it received, compares in constant time, and refuses a timestamp more than
`REPLAY_WINDOW_S` away from its clock: a captured request replayed later is refused, and
one replayed within the window carries the same `Idempotency-Key` as the original, which
the receiver keeps for the window and answers again without acting twice.

Acknowledgement token: `<base64url(JSON claim)>.<base64url(HMAC of that text)>` under
`notify.ack_secret`, with an expiry; whoever holds the link may acknowledge that one
alert until then, and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import asdict, dataclass
from typing import Literal

REPLAY_WINDOW_S = 300
SIGNATURE_HEADER = "X-Radtriage-Signature"
TIMESTAMP_HEADER = "X-Radtriage-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"


class SignatureError(ValueError):
    """A webhook request whose signature does not hold (receivers' side)."""


def webhook_signature(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_webhook(
    secret: str, body: bytes, timestamp: str | None, signature: str | None, now: float
) -> None:
    """Raise SignatureError unless `signature` is this body's and `timestamp` is recent."""
    if not timestamp or not signature:
        raise SignatureError("missing signature or timestamp header")
    try:
        ts = int(timestamp)
    except ValueError:
        raise SignatureError("timestamp is not an integer") from None
    if abs(now - ts) > REPLAY_WINDOW_S:
        raise SignatureError(f"timestamp outside the {REPLAY_WINDOW_S} s replay window")
    if not hmac.compare_digest(webhook_signature(secret, body, ts), signature):
        raise SignatureError("signature does not match the body")


TokenProblem = Literal["malformed", "bad_signature", "expired"]


class AckTokenError(ValueError):
    def __init__(self, problem: TokenProblem) -> None:
        super().__init__(problem)
        self.problem: TokenProblem = problem


@dataclass(frozen=True)
class AckClaim:
    """What an acknowledgement link may acknowledge, and for whom it was made."""

    alert_id: str
    study_uid: str
    accession_number: str
    finding: str
    recipient: str
    step: int
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, text: str) -> bytes:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).digest()


def make_ack_token(secret: str, claim: AckClaim) -> str:
    payload = _b64(json.dumps(asdict(claim), separators=(",", ":"), sort_keys=True).encode())
    return f"{payload}.{_b64(_mac(secret, payload))}"


def read_ack_token(secret: str, token: str, now: float) -> AckClaim:
    """The claim of a valid, unexpired token; AckTokenError(problem) otherwise."""
    payload, dot, mac = token.partition(".")
    if not dot or not payload or not mac or len(token) > 4096:
        raise AckTokenError("malformed")
    try:
        given = _unb64(mac)
    except (ValueError, TypeError):
        raise AckTokenError("malformed") from None
    if not hmac.compare_digest(_mac(secret, payload), given):
        raise AckTokenError("bad_signature")
    try:
        claim = AckClaim(**json.loads(_unb64(payload)))
    except (ValueError, TypeError):
        raise AckTokenError("malformed") from None
    if now > claim.expires:
        raise AckTokenError("expired")
    return claim


def idempotency_key(alert_id: str, recipient: str, step: int) -> str:
    """One notification's identity: the same alert, recipient and step is the same message,
    whoever sends it and however often (carried as Idempotency-Key and the mail's Message-ID)."""
    return hashlib.sha256(f"{alert_id}\x00{recipient}\x00{step}".encode()).hexdigest()[:32]
