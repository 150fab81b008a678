"""Kept SMTP connections to the mail relay: a notification's e-mail goes over a connection
that is already open (EHLO, STARTTLS and login done) instead of a new session each.

A new session per e-mail was the largest share of the notify stage's CPU under a flood
(bench/RESULTS.md, "Under a flood": the TCP connect, EHLO twice, the TLS handshake and
the login, ~6 ms of client CPU a message, on the event loop, before MAIL FROM). Here:
- at most `smtp.connections` open at once per relay (bounded; sends beyond wait their turn:
  SMTP is one conversation at a time per connection);
- a connection idle for `smtp.idle_s` is closed before reuse and a new one made (relays
  drop idle clients, typically after 30-300 s);
- a failed send closes its connection (its state is unknown); a send that fails on a
  *reused* connection because the relay had dropped it is tried once more on a new one,
  since nothing of it can have been accepted (the relay sees the same Message-ID if it had).
Errors are the channel's (processors/notify/channels.py maps them to ChannelError).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from email.message import EmailMessage

import aiosmtplib

from radtriage.settings import SmtpSettings

TlsContext = Callable[[SmtpSettings], ssl.SSLContext]


class SmtpRelay:
    def __init__(
        self, smtp: SmtpSettings, tls_context: TlsContext, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.smtp = smtp
        self._tls_context = tls_context
        self._clock = clock
        # Open connections not in use, with when each was last used (most recent last).
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._slots = asyncio.Semaphore(max(1, smtp.connections))
        # For tests and the bench: how many sessions were opened.
        self.opened = 0

    def _new(self) -> aiosmtplib.SMTP:
        s = self.smtp
        return aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            # True: STARTTLS is required (a relay not offering it is an error, not plain text).
            start_tls=s.starttls,
            use_tls=False,
            tls_context=self._tls_context(s) if s.starttls else None,
            username=s.username or None,
            password=s.password.get_secret_value() or None,
            timeout=s.timeout_s,
        )

    async def _connect(self) -> aiosmtplib.SMTP:
        client = self._new()
        await client.connect()
        self.opened += 1
        return client

    def _take_idle(self) -> aiosmtplib.SMTP | None:
        """The most recently used open connection young enough to trust, else None; stale
        ones are closed on the way."""
        now = self._clock()
        while self._idle:
            client, used = self._idle.pop()
            if client.is_connected and now - used < self.smtp.idle_s:
                return client
            client.close()
        return None

    async def send(self, mail: EmailMessage) -> None:
        async with self._slots:
            client = self._take_idle()
            if client is not None:
                try:
                    await client.send_message(mail)
                    self._idle.append((client, self._clock()))
                    return
                except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                    client.close()  # dropped by the relay while idle: once more on a new one
                except BaseException:
                    client.close()
                    raise
            client = await self._connect()
            try:
                await client.send_message(mail)
            except BaseException:
                client.close()
                raise
            self._idle.append((client, self._clock()))

    async def close(self) -> None:
        """QUIT every idle connection (at shutdown); errors do not matter any more."""
        idle, self._idle = self._idle, []
        for client, _ in idle:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()
