"""The DICOM listener: pynetdicom's server on `dicom.port` and, with `dicom.tls`, a second on
`dicom.tls_port`, with the StoreSCP's handlers (connectors/dicom/scp.py); `radtriage
dicom-scp` runs it until SIGTERM.

TLS handshakes run on each connection's own thread, bounded in time
(`dicom.tls.handshake_timeout_s`), so a peer that connects and says nothing holds up no
other sender. Stopping stops accepting, lets open associations finish for a short grace,
aborts the rest (their senders retry) and ends their spans.
"""

from __future__ import annotations

import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from pydicom import config as pydicom_config
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from connectors.dicom import validation as v
from connectors.dicom.scp import StoreSCP
from connectors.publisher import EventPublisher
from radtriage import metrics
from radtriage.settings import Settings
from radtriage.tls import server_context

log = logging.getLogger(__name__)

# How long stop() lets open associations finish before aborting them.
_STOP_GRACE_S = 5.0


class AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake on each connection's own thread.

    pynetdicom wraps an accepted socket in `get_request`, on the single thread that accepts
    every connection, with a blocking handshake: one peer that opens a TCP connection to the
    TLS port and sends nothing would stop every other sender from connecting. Here
    `get_request` only accepts; the handshake runs in `process_request_thread` (the
    connection's thread) and gives up after `handshake_timeout_s`. Used through
    `AE.make_server(server_class=...)`, pynetdicom's documented way to a custom server.
    """

    def __init__(self, *args: Any, handshake_timeout_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handshake_timeout_s = handshake_timeout_s

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        # A C-STORE response is one small PDU: with Nagle on, it waits for the sender's
        # delayed ACK (~40 ms on Linux) whenever the previous segment is unacknowledged,
        # which caps one association at a few dozen instances a second.
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            request = self._handshake(self.ssl_context, request, client_address)
            if request is None:
                return
        super().process_request_thread(request, client_address)

    def _handshake(
        self, context: ssl.SSLContext, raw: socket.socket, client_address: Any
    ) -> ssl.SSLSocket | None:
        address = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        try:
            raw.settimeout(self.handshake_timeout_s)
            tls = context.wrap_socket(raw, server_side=True)
            tls.settimeout(None)  # as pynetdicom has it: blocking; the ACSE/network timeouts apply
            return tls
        except OSError as exc:  # ssl.SSLError, a timeout, a reset
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.warning("DICOM TLS connection from %s refused: handshake failed (%s)", address, reason)
            metrics.DICOM_ASSOCIATION_REFUSALS.labels("tls_handshake_failed").inc()
            self.shutdown_request(raw)
            return None


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.dicom.ae_title)
    ae.maximum_pdu_size = settings.dicom.max_pdu
    # Every storage SOP class, in every transfer syntax radtriage stores and decodes
    # (validation.TRANSFER_SYNTAXES, in order of preference): the instance is stored as
    # received. pynetdicom's 128-context limit is the requestor's; as acceptor any number
    # of supported contexts is fine.
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, list(v.TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)  # C-ECHO, answered by pynetdicom's default handler
    # The second line behind connectors/dicom/negotiation.on_requested, which decides first (and logs why).
    ae.require_calling_aet = sorted({caller.ae_title for caller in settings.dicom.allowed_callers})
    ae.require_called_aet = settings.dicom.called_ae_title_required
    return ae


def _serve(
    ae: AE, address: tuple[str, int], scp: StoreSCP, context: ssl.SSLContext | None, settings: Settings
) -> AssociationServer:
    """One listening server on its own thread, as `AE.start_server(block=False)` starts it."""
    server = cast(
        AssociationServer,
        ae.make_server(
            address,
            ssl_context=context,
            evt_handlers=scp.handlers(),
            server_class=AssociationServer,
            handshake_timeout_s=settings.dicom.tls.handshake_timeout_s,
        ),
    )
    # start_server registers its servers with the AE the same way; `shutdown()` removes it.
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{address[1]}", daemon=True).start()
    return server


def start_scp(
    settings: Settings, publisher: EventPublisher | None = None
) -> tuple[list[AssociationServer], Callable[[], None]]:
    """Start listening without blocking; returns the servers (plain on `dicom.port`, TLS on
    `dicom.tls_port`, each if enabled) and a `stop()` function.

    `stop()` stops accepting, lets open associations finish for a short grace (at most
    5 s), aborts the rest (their senders retry), ends their spans and closes the
    publisher if this listener created it (a publisher passed in is the caller's).
    A TLS configuration that cannot be used raises `TlsConfigError` before anything listens.
    """
    dicom = settings.dicom
    context = server_context(dicom.tls, "dicom.tls") if dicom.tls.enabled else None
    # Left at its default (WARN), pydicom logs some invalid values verbatim while decoding
    # (a malformed UI, for one) — dataset bytes in our log. The listener's refusals carry
    # its own reasons instead. Process-wide, which is what `radtriage dicom-scp` is.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    scp = StoreSCP(settings, publisher)
    ae = build_ae(settings)
    servers: list[AssociationServer] = []
    try:
        if dicom.plain_enabled:
            servers.append(_serve(ae, (dicom.bind_address, dicom.port), scp, None, settings))
        if context is not None:
            servers.append(_serve(ae, (dicom.bind_address, dicom.tls_port), scp, context, settings))
    except BaseException:
        for server in servers:
            server.shutdown()
        if scp.owns_publisher:
            scp.publisher.close()
        raise
    stopped = threading.Event()

    def active() -> list[Any]:
        return [assoc for server in servers for assoc in server.active_associations]

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        for server in servers:
            server.shutdown()
        # A short grace for associations in flight (a small study finishes, a C-STORE gets
        # its answer); the rest are aborted and their senders retry. Bounded so that the
        # whole stop stays well inside a supervisor's SIGTERM-to-SIGKILL window.
        deadline = time.monotonic() + min(settings.kafka.produce_timeout_s, _STOP_GRACE_S)
        while active() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in active():
            assoc.abort()
        scp.associations.finish_all()
        if scp.owns_publisher:
            scp.publisher.close()

    return servers, stop


def run_scp(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and let open associations finish."""
    stop_requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_requested.set())
    metrics.start_process_metrics(settings)
    servers, stop = start_scp(settings)
    dicom = settings.dicom
    log.info(
        "DICOM C-STORE SCP %s listening on %s (%s)",
        dicom.ae_title,
        ", ".join(
            f"{dicom.bind_address}:{server.server_address[1]}{' TLS' if server.ssl_context else ''}"
            for server in servers
        ),
        f"{len({c.ae_title for c in dicom.allowed_callers})} allowed calling AE titles"
        if dicom.allowed_callers
        else "any caller",
    )
    try:
        stop_requested.wait()
    finally:
        stop()
