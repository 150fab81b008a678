"""Real peers of the notify stage: an HTTP server receiving webhooks and verifying their
signature as a receiver should (processors/notify/signing.py), and an SMTP server
(aiosmtpd) that requires STARTTLS. Both record what they accepted, with the receipt time.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from processors.notify.signing import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    verify_webhook,
)
from tests.certs import Pki, make_pki
from tests.support.net import free_port


@dataclass
class Received:
    path: str
    body: dict[str, Any]
    key: str
    at: float  # time.time() at receipt


@dataclass
class WebhookReceiver:
    """Accepts POSTs whose signature holds (401 otherwise); `down` answers 503 instead.
    A repeated Idempotency-Key is answered 200 and counted in `duplicates`, not in `received`."""

    secret: str = ""
    down: bool = False
    received: list[Received] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


@contextmanager
def webhook_receiver(secret: str = "") -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(secret=secret, port=free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            now = time.time()
            if receiver.down:
                self._answer(503)
                return
            if receiver.secret:
                try:
                    verify_webhook(
                        receiver.secret,
                        raw,
                        self.headers.get(TIMESTAMP_HEADER),
                        self.headers.get(SIGNATURE_HEADER),
                        now,
                    )
                except SignatureError as exc:
                    with receiver.lock:
                        receiver.refused.append(str(exc))
                    self._answer(401)
                    return
            key = self.headers.get(IDEMPOTENCY_HEADER, "")
            with receiver.lock:
                if key and any(r.key == key for r in receiver.received):
                    receiver.duplicates.append(key)
                else:
                    receiver.received.append(Received(self.path, json.loads(raw), key, now))
            self._answer(200)

        def _answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", receiver.port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Mail:
    to: list[str]
    message: Message
    tls: bool
    at: float
    # The client's address and port: one per SMTP connection (to count sessions).
    peer: str = ""


class _Inbox:
    def __init__(self) -> None:
        self.mails: list[Mail] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        with self.lock:
            self.mails.append(
                Mail(
                    list(envelope.rcpt_tos),
                    message_from_bytes(content),
                    session.ssl is not None,
                    time.time(),
                    str(session.peer),
                )
            )
        return "250 OK"


@dataclass
class SmtpServer:
    port: int
    inbox: _Inbox

    @property
    def mails(self) -> list[Mail]:
        with self.inbox.lock:
            return list(self.inbox.mails)


@contextmanager
def smtp_server(pki: Pki) -> Iterator[SmtpServer]:
    """aiosmtpd on 127.0.0.1 with the test CA's server certificate; MAIL before STARTTLS is refused."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    inbox = _Inbox()
    port = free_port()
    controller = Controller(
        inbox, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True, ready_timeout=10
    )
    controller.start()
    try:
        yield SmtpServer(port, inbox)
    finally:
        controller.stop()


def smtp_env(server: SmtpServer, ca: Path) -> dict[str, str]:
    return {
        "RADTRIAGE_NOTIFY__SMTP__HOST": "127.0.0.1",
        "RADTRIAGE_NOTIFY__SMTP__PORT": str(server.port),
        "RADTRIAGE_NOTIFY__SMTP__STARTTLS": "true",
        "RADTRIAGE_NOTIFY__SMTP__FROM": "radtriage@test.example",
        "RADTRIAGE_NOTIFY__SMTP__CAFILE": str(ca),
    }


@contextmanager
def notify_peers(secret: str, pki_dir: Path) -> Iterator[tuple[WebhookReceiver, SmtpServer, dict[str, str]]]:
    """A webhook receiver checking `secret`, an SMTP server with STARTTLS (its certificate from
    a PKI made in `pki_dir`), and the worker's settings that mail there."""
    pki = make_pki(pki_dir)
    with webhook_receiver(secret) as hooks, smtp_server(pki) as smtp:
        yield hooks, smtp, smtp_env(smtp, pki.ca)
