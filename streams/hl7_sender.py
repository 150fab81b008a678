"""Sending one HL7 v2 message over MLLP and waiting for its ACK, retried to a deadline.

One connection per attempt: a RIS that restarted, or a load balancer that dropped an idle
connection, costs nothing, and an ACK is never matched to the wrong message. The outcome
is a value the stage turns into an audit event or a dead letter:

- `Delivered`: the receiver answered AA (or CA, enhanced mode);
- `Refused`: it answered AE/AR (CE/CR) — its reason (MSA-3, else ERR) is kept; resending
  the same message would be refused again, so it is not retried;
- `Undelivered`: no usable answer (refused connection, timeout, a closed socket, an ACK
  for another control id, an unreadable answer) on every attempt until the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from processors.hl7_oru import AckAnswer, read_ack
from radtriage.mllp_framing import Frame, FrameDecoder, Oversized, frame
from streams.retry import Retry, Undelivered, until_answered

log = logging.getLogger(__name__)

# An ACK is a few hundred bytes; anything this large is not one.
ACK_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Delivered:
    ack: AckAnswer
    attempts: int


@dataclass(frozen=True)
class Refused:
    ack: AckAnswer
    attempts: int


Outcome = Delivered | Refused | Undelivered


class NoAnswer(Exception):
    """This attempt got no usable ACK; the message says why."""


@dataclass(frozen=True)
class Peer:
    host: str
    port: int
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None


async def exchange(peer: Peer, payload: bytes, control_id: str, ack_timeout_s: float) -> AckAnswer:
    """One attempt: connect, send the framed message, read frames until the ACK of
    `control_id` (NoAnswer on anything else, within `ack_timeout_s` overall)."""

    async def attempt() -> AckAnswer:
        try:
            reader, writer = await asyncio.open_connection(
                peer.host,
                peer.port,
                ssl=peer.ssl,
                server_hostname=(peer.server_hostname or peer.host) if peer.ssl else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise NoAnswer(f"cannot connect to {peer.host}:{peer.port}: {exc}") from exc
        try:
            writer.write(frame(payload))
            await writer.drain()
            decoder = FrameDecoder(ACK_MAX_BYTES)
            while True:
                data = await reader.read(65536)
                if not data:
                    raise NoAnswer("the receiver closed the connection without an ACK")
                for item in decoder.feed(data):
                    if isinstance(item, Oversized):
                        raise NoAnswer("the answer is larger than any ACK")
                    if not isinstance(item, Frame):
                        continue  # junk between frames, or a restarted frame
                    try:
                        ack = read_ack(item.payload)
                    except ValueError as exc:
                        raise NoAnswer(f"unreadable answer: {exc}") from exc
                    if ack.control_id != control_id:
                        raise NoAnswer(f"ACK for control id {ack.control_id!r}, not {control_id!r}")
                    return ack
        except (OSError, ssl.SSLError) as exc:
            raise NoAnswer(f"connection to {peer.host}:{peer.port} failed: {exc}") from exc
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass  # the peer went first; nothing is lost

    try:
        return await asyncio.wait_for(attempt(), ack_timeout_s)
    except TimeoutError:
        raise NoAnswer(f"no ACK within {ack_timeout_s:g} s") from None


async def deliver(
    send: Callable[[], Awaitable[AckAnswer]],
    retry: Retry,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Outcome:
    """`send` until it is answered, or the deadline passes."""
    answered = await until_answered(send, retry, NoAnswer, "ORU", clock=clock, sleep=sleep)
    if isinstance(answered, Undelivered):
        return answered
    ack, attempts = answered
    return Delivered(ack, attempts) if ack.accepted else Refused(ack, attempts)
