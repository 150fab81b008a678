"""HL7 v2 MLLP listener: every message answered, and AA/CA only once its events are in Kafka.

Per message (in a worker thread, so neither hl7apy nor a blocking acks=all publish
ever stalls the event loop): parse → publish each event with acks=all → ACK. The
answers:
- AA / CA: every event of the message is acknowledged by Kafka (orders on
  `topics.orders` keyed by accession, ADT on `topics.encounters` keyed by patient id),
  or the message is one we ignore politely (ORU: AA with an informational ERR);
- AE / AR (CE / CR): the message is refused with its table-0357 code, location and
  reason; its raw bytes go to the local quarantine and a PHI-free summary to
  `topics.deadletter`;
- AR / CR 207 "event log unavailable, retry later": Kafka (or the quarantine disk) did
  not take it in time. The sender keeps the message and retries; nothing is ever
  acknowledged that is not durably stored.

Connections: any number concurrently, each one's messages strictly in order (the next
frame is read only after the previous one is answered). Junk between frames is dropped
and the decoder resyncs on the next start block; a frame over `hl7.max_message_bytes`
is refused (AR) and its connection closed; a connection silent for
`hl7.idle_timeout_s` is closed. No input can stop the listener: whatever fails while
handling one message becomes that message's AR, and the connection stays open.

Access (issue 7): a connection from an address outside `hl7.allowed_sources` (when set)
is closed before a byte is read; with `hl7.tls` enabled the port speaks TLS only (the
handshake comes after the source check, bounded by `hl7.tls.handshake_timeout_s`, with
client certificates required when `hl7.tls.client_ca_file` is set). Both refusals are
logged with the peer address and counted (radtriage_hl7_connections_refused_total).

Observability: one SERVER span "hl7.receive" per message (hl7.message_type,
hl7.control_id, hl7.version, hl7.ack_code, hl7.error_code, messaging.*), one PRODUCER
span per published event, whose W3C traceparent travels in the Kafka headers. Logs
carry message type, control id, ACK code and reason — never names, birth dates,
addresses or the raw message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import ssl
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from connectors.allowlist import source_allowed
from connectors.hl7.ack import AckError, Kind, ack_code, build_ack, outcome_ack
from connectors.hl7.message import Header, token, version_token
from connectors.hl7.parse import Accepted, Outcome, Rejected, oversized, parse_message
from connectors.hl7.quarantine import Quarantine
from connectors.publisher import EventPublisher, PublishError
from connectors.serving import serve_until_signalled
from radtriage import metrics
from radtriage.mllp_framing import Abandoned, FrameDecoder, Junk, Oversized, frame
from radtriage.settings import Settings
from radtriage.tls import server_context
from schemas.deadletter import DeadLetter
from schemas.encounters import EncounterEvent
from schemas.orders import OrderEvent

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

SOURCE = "hl7.mllp"
STAGE = "hl7.intake"
RETRY_LATER = "event log unavailable, retry later"

_READ_CHUNK = 64 * 1024
# Worker threads: one per connection with a message in flight (each waits on its own
# acks=all publish); beyond that, connections queue for a thread.
_WORKERS = 32


@dataclass(frozen=True)
class Reply:
    data: bytes  # the framed ACK
    code: str  # MSA-1


def _traceparent() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def _new_control_id() -> str:
    # MSH-10 is ST(20) up to v2.5: a prefix and 18 hex digits.
    return "RT" + uuid.uuid4().hex[:18]


def _last_resort_ack() -> bytes:
    """An AR that needs nothing from the message: for a failure while building the real ACK."""
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    text = (
        f"MSH|^~\\&|RADTRIAGE||||{now}||ACK|{_new_control_id()}|P|2.5\rMSA|AR||application internal error\r"
    )
    return frame(text.encode("ascii"))


def _summary(outcome: Rejected, data: bytes, digest: str, uri: str, ack: str, truncated: bool) -> str:
    """The dead letter's payload: what an operator needs to find the message, and no PHI."""
    header = outcome.header
    return json.dumps(
        {
            "message_type": header.message_type,
            "control_id": token(header.control_id),
            "version": version_token(header.version),
            "segments": list(outcome.segment_ids[:200]),
            "size": len(data),
            "truncated": truncated,
            "sha256": digest,
            "quarantine_uri": uri,
            "ack_code": ack,
            "error_code": outcome.code,
            "error_location": str(outcome.location) if outcome.location else "",
        },
        separators=(",", ":"),
    )


class Intake:
    """The synchronous work for one message: parse, store, answer. Thread-safe (no shared
    mutable state besides the thread-safe publisher)."""

    def __init__(self, settings: Settings, publisher: EventPublisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self.quarantine = Quarantine(settings.home / "quarantine" / "hl7")

    # -- side effects --------------------------------------------------------------------

    def _publish(self, topic: str, key: str, event: OrderEvent | EncounterEvent | DeadLetter) -> None:
        # The publisher makes the PRODUCER span ("send <topic>", partition, offset; the key
        # only on topics not keyed by patient id).
        self.publisher.publish(topic, key, event, _traceparent())

    def _publish_events(self, outcome: Accepted) -> None:
        topics = self.settings.topics
        for event in outcome.events:
            if isinstance(event, OrderEvent):
                self._publish(topics.orders, event.accession_number, event)
            else:
                self._publish(topics.encounters, event.patient_id, event)

    def _dead_letter(self, outcome: Rejected, data: bytes, ack: str, truncated: bool) -> None:
        digest, uri = self.quarantine.put(data)
        where = f" at {outcome.location}" if outcome.location else ""
        letter = DeadLetter(
            source_topic=SOURCE,
            stage=STAGE,
            error=f"{ack} {outcome.code}{where}: {outcome.reason}",
            key=token(outcome.header.control_id),
            payload=_summary(outcome, data, digest, uri, ack, truncated),
        )
        # Keyed by content: a sender's retries of one broken message share a partition.
        self._publish(self.settings.topics.deadletter, digest, letter)
        metrics.DEAD_LETTERS.labels(STAGE).inc()

    # -- one message ---------------------------------------------------------------------

    def handle(self, data: bytes, *, truncated: bool = False, peer: str = "") -> Reply:
        """Answer one frame's bytes (or, `truncated`, the prefix of an oversized frame)."""
        try:
            with tracer.start_as_current_span(
                "hl7.receive",
                kind=SpanKind.SERVER,
                attributes={"hl7.size": len(data), "network.peer.address": peer, "messaging.system": "kafka"},
            ) as span:
                return self._handle(span, data, truncated, peer)
        except Exception as exc:  # never let one message take the connection down
            log.error(
                "HL7 message from %s: internal error %s\n%s",
                peer,
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            metrics.count_hl7_message(None, "AR")
            return Reply(_last_resort_ack(), "AR")

    def _handle(self, span: trace.Span, data: bytes, truncated: bool, peer: str) -> Reply:
        limit = self.settings.hl7.max_message_bytes
        outcome: Outcome = oversized(data, limit) if truncated else parse_message(data)
        header = outcome.header
        span.set_attributes(
            {
                "hl7.message_type": header.message_type,
                "hl7.control_id": token(header.control_id),
                "hl7.version": version_token(header.version),
            }
        )
        kind, error = outcome_ack(outcome)
        cause = ""
        try:
            if isinstance(outcome, Accepted):
                self._publish_events(outcome)
                span.set_attribute("messaging.batch.message_count", len(outcome.events))
                span.set_attribute(
                    "messaging.destination.name",
                    self.settings.topics.orders
                    if isinstance(outcome.events[0], OrderEvent)
                    else self.settings.topics.encounters,
                )
            elif isinstance(outcome, Rejected):
                self._dead_letter(outcome, data, ack_code(header, kind), truncated)
        except PublishError as exc:
            kind, error, cause = "reject", AckError(207, RETRY_LATER), str(exc)
        except OSError as exc:
            # The quarantine could not be written: not stored, so not answered as handled.
            kind, error = "reject", AckError(207, "quarantine unavailable, retry later")
            cause = f"quarantine: {type(exc).__name__} {exc.errno or ''}".strip()
        return self._reply(span, header, kind, error, cause, peer)

    def _reply(
        self, span: trace.Span, header: Header, kind: Kind, error: AckError | None, cause: str, peer: str
    ) -> Reply:
        code = ack_code(header, kind)
        text = build_ack(header, kind, error, now=datetime.now(UTC), control_id=_new_control_id())
        span.set_attribute("hl7.ack_code", code)
        metrics.count_hl7_message(header.message_type, code)
        if error is not None:
            span.set_attribute("hl7.error_code", error.code)
            if error.severity == "E":
                span.set_status(Status(StatusCode.ERROR, error.reason))
        level = logging.INFO if kind == "accept" else logging.WARNING
        log.log(
            level,
            "HL7 %s %s from %s: %s%s%s",
            header.message_type or "<unreadable type>",
            token(header.control_id) or "<no control id>",
            peer,
            code,
            f" {error.code} {error.reason}" if error is not None else "",
            f" ({cause})" if cause else "",
        )
        return Reply(frame(text.encode(header.codec, errors="replace")), code)


@dataclass(eq=False)
class _Connection:
    peer: str
    busy: bool = False


class Hl7Listener:
    """The running server: `port`, and `await stop()`."""

    def __init__(self, settings: Settings, publisher: EventPublisher | None = None) -> None:
        self.settings = settings
        # First: unusable TLS settings stop the start (TlsConfigError) before anything runs.
        self._tls = server_context(settings.hl7.tls, "hl7.tls") if settings.hl7.tls.enabled else None
        self.owns_publisher = publisher is None
        self.publisher = publisher or EventPublisher(
            settings.kafka,
            timeout_s=settings.kafka.produce_timeout_s,
            client_id="radtriage-hl7",
        )
        self.intake = Intake(settings, self.publisher)
        self._executor = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="hl7-intake")
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        self._admitting: set[asyncio.Task[Any]] = set()
        self._stopping = False

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets, "listener not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # hl7apy loads its structure tables on first use (~0.2 s): not on a sender's clock.
        await loop.run_in_executor(self._executor, _warm_up)
        self._server = await asyncio.start_server(
            self._serve, self.settings.hl7.bind_address, self.settings.hl7.port, limit=_READ_CHUNK
        )

    async def stop(self) -> None:
        """Stop accepting, let messages being handled finish and be answered (bounded),
        close every connection, then the publisher if this listener created it."""
        if self._stopping:
            return
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for task in list(self._admitting):
            task.cancel()
        for task, conn in list(self._connections.items()):
            if not conn.busy:
                task.cancel()
        tasks = list(self._connections)
        if tasks:
            # A message in flight is answered within the produce timeout (its publish
            # either acks or fails by then): wait that long, no longer.
            grace = self.settings.kafka.produce_timeout_s + 1.0
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        # A worker still blocked in a publish finishes on its own; its sender never got an
        # ACK and will resend.
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.owns_publisher:
            await asyncio.to_thread(self.publisher.close)

    async def _admit(self, writer: asyncio.StreamWriter, address: str, peer: str) -> bool:
        """The source check, then the TLS handshake if on; False: the connection was closed.

        Nothing may be awaited before `start_tls`: bytes of the client's hello that the
        stream had already buffered would be lost to the handshake."""
        hl7 = self.settings.hl7
        if not source_allowed(address, hl7.allowed_sources):
            log.warning("HL7 connection from %s refused: source address not in hl7.allowed_sources", peer)
            metrics.HL7_CONNECTIONS_REFUSED.labels("source_not_allowed").inc()
            writer.transport.abort()  # at once: nothing read, nothing answered
            return False
        if self._tls is None:
            return True
        try:
            await writer.start_tls(self._tls, ssl_handshake_timeout=hl7.tls.handshake_timeout_s)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else type(exc).__name__
            log.warning("HL7 TLS connection from %s refused: handshake failed (%s)", peer, reason)
            metrics.HL7_CONNECTIONS_REFUSED.labels("tls_handshake_failed").inc()
            writer.transport.abort()
            return False
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peername = writer.get_extra_info("peername")
        address = str(peername[0]) if isinstance(peername, tuple) else ""
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername or "")
        # Tracked while admitting too, so that stop() does not wait out a handshake.
        self._admitting.add(task)
        try:
            admitted = not self._stopping and await self._admit(writer, address, peer)
        except asyncio.CancelledError:
            admitted = False
        finally:
            self._admitting.discard(task)
        if not admitted:
            writer.transport.abort()
            return
        conn = _Connection(peer)
        self._connections[task] = conn
        metrics.HL7_OPEN_CONNECTIONS.inc()
        try:
            if not self._stopping:
                await self._converse(reader, writer, conn)
        except (ConnectionError, TimeoutError) as exc:
            log.info("HL7 connection from %s lost: %s", peer, type(exc).__name__)
        except asyncio.CancelledError:
            pass  # stop(): the connection was idle, or its grace ran out
        except Exception as exc:  # the listener outlives any connection's failure
            log.error(
                "HL7 connection from %s failed: %s\n%s",
                peer,
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
        finally:
            metrics.HL7_OPEN_CONNECTIONS.dec()
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection
    ) -> None:
        hl7 = self.settings.hl7
        decoder = FrameDecoder(hl7.max_message_bytes)
        loop = asyncio.get_running_loop()
        log.debug("HL7 connection from %s", conn.peer)
        while not self._stopping:
            try:
                data = await asyncio.wait_for(reader.read(_READ_CHUNK), hl7.idle_timeout_s)
            except TimeoutError:
                log.info("HL7 connection from %s idle for %gs: closed", conn.peer, hl7.idle_timeout_s)
                return
            if not data:
                if decoder.pending:
                    log.warning(
                        "HL7 connection from %s closed mid-frame (%d bytes unanswered)",
                        conn.peer,
                        decoder.pending,
                    )
                return
            for item in decoder.feed(data):
                if isinstance(item, Junk | Abandoned):
                    what = (
                        "bytes outside MLLP frames"
                        if isinstance(item, Junk)
                        else "bytes of an unfinished frame"
                    )
                    log.warning("HL7 connection from %s: dropped %d %s", conn.peer, item.size, what)
                    continue
                truncated = isinstance(item, Oversized)
                payload = item.prefix if isinstance(item, Oversized) else item.payload
                conn.busy = True
                try:
                    handle = functools.partial(
                        self.intake.handle, payload, truncated=truncated, peer=conn.peer
                    )
                    reply = await loop.run_in_executor(self._executor, handle)
                    writer.write(reply.data)
                    await asyncio.wait_for(writer.drain(), hl7.idle_timeout_s)
                finally:
                    conn.busy = False
                if truncated:
                    log.warning("HL7 connection from %s closed after an oversized frame", conn.peer)
                    return
                if self._stopping:
                    # Frames already buffered behind this one were never answered: the
                    # sender resends them to the next listener.
                    return


def _warm_up() -> None:
    parse_message(
        b"MSH|^~\\&|A|B|C|D|20240101000000||ORM^O01|WARMUP|P|2.5\r"
        b"PID|1||1\rPV1|1|O\rORC|NW|1|1\rTQ1|1||||||||R\rOBR|1|1|1|X^X||||||||||||||1\rIPC|1||1.2|1\r"
    )


async def start_listener(settings: Settings, publisher: EventPublisher | None = None) -> Hl7Listener:
    """Start serving on `settings.hl7.bind_address:port` (port 0: any free port, see `.port`)."""
    listener = Hl7Listener(settings, publisher)
    await listener.start()
    return listener


async def _serve_until_signalled(settings: Settings) -> None:
    hl7 = settings.hl7

    def announce(listener: Hl7Listener) -> None:
        log.info(
            "HL7 MLLP listener on %s:%d%s (%s; Kafka %s)",
            hl7.bind_address,
            listener.port,
            " TLS" + (" with client certificates" if hl7.tls.client_ca_file else "")
            if hl7.tls.enabled
            else "",
            f"{len(hl7.allowed_sources)} allowed source networks" if hl7.allowed_sources else "any source",
            settings.kafka.bootstrap_servers,
        )

    await serve_until_signalled(
        lambda: start_listener(settings),
        announce,
        log,
        stopping="HL7 MLLP listener stopping: finishing messages in flight",
        stopped="HL7 MLLP listener stopped",
    )


def run_listener(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully (in-flight messages are answered)."""
    metrics.start_process_metrics(settings)
    asyncio.run(_serve_until_signalled(settings))
