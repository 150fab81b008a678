"""Issue 7 on the MLLP port, against a real Kafka: the source allow-list and TLS.

Peers: python-hl7's `mllp_send` (from 127.0.0.1, allowed), plain sockets bound to
127.0.0.2 (any 127/8 address is local on Linux) for a disallowed source, and
ssl-wrapped sockets with certificates the test makes (tests/certs.py) for TLS.
Each test has its own topics, so "nothing else reached Kafka" is checked over all of them.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from connectors.hl7.mllp import Hl7Listener
from radtriage.mllp_framing import frame
from radtriage.settings import Settings, TlsSettings, parse_network
from radtriage.tls import TlsConfigError
from tests.certs import Pki, make_pki
from tests.data.hl7 import samples
from tests.integration.test_hl7_mllp import (
    EB,
    SB,
    ListenerThread,
    Tail,
    check_ack,
    hl7_settings,
    mllp_send,
    parse_accession,
    read_acks,
    recv_eof,
)

pytestmark = pytest.mark.integration

REFUSED = "radtriage_hl7_connections_refused_total"


def _refused(reason: str) -> float:
    return REGISTRY.get_sample_value(REFUSED, {"reason": reason}) or 0.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _client_context(pki: Pki, cert: bool = True, ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca or pki.ca))
    if cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


@contextmanager
def _tls_connection(port: int, context: ssl.SSLContext) -> Iterator[ssl.SSLSocket]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            yield tls


def _orders(tail: Tail, s: Settings) -> list[str]:
    return [r.value["accession_number"] for r in tail.of(s.topics.orders)]


def test_source_allow_list(kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = hl7_settings(kafka_bootstrap, tmp_path)
    s.hl7.allowed_sources = [parse_network("127.0.0.1"), parse_network("10.1.2.0/24")]
    refused_order, allowed_order = samples.unique_orm(), samples.unique_orm()
    batch = tmp_path / "batch.hl7"
    batch.write_bytes(SB + allowed_order + EB + b"\r")
    before = _refused("source_not_allowed")
    caplog.set_level(logging.INFO, logger="connectors.hl7.mllp")
    tail = Tail(kafka_bootstrap, [s.topics.orders, s.topics.encounters, s.topics.deadletter])
    try:
        with ListenerThread(s) as lt:
            # From 127.0.0.2: closed without an answer, whatever it sends.
            for _ in range(3):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.2", 0))
                    sock.connect(("127.0.0.1", lt.port))
                    try:
                        sock.sendall(frame(refused_order))
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # already closed by the listener
                    assert recv_eof(sock), "a refused connection must be closed"
            # From 127.0.0.1, python-hl7's own client: AA as always.
            (ack,) = mllp_send(lt.port, batch)
            assert check_ack(ack)[0] == "AA"
            tail.until(lambda: parse_accession(allowed_order) in _orders(tail, s))
            tail.drain(2.0)
    finally:
        tail.close()
    # Only the allowed sender's order reached Kafka; the refused one went nowhere.
    assert _orders(tail, s) == [parse_accession(allowed_order)]
    assert len(tail.records) == 1
    assert _refused("source_not_allowed") - before == 3
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 3
    assert all("127.0.0.2" in r.getMessage() and "hl7.allowed_sources" in r.getMessage() for r in refusals)
    # Never a frame of the refused connection in the log (no PHI, nothing parsed).
    assert parse_accession(refused_order) not in caplog.text


def test_tls(kafka_bootstrap: str, tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    s = hl7_settings(kafka_bootstrap, tmp_path)
    s.hl7.tls = TlsSettings(
        enabled=True, cert_file=pki.server_cert, key_file=pki.server_key, handshake_timeout_s=2
    )
    plain_order, garbage_order, tls_orders = (
        samples.unique_orm(),
        samples.unique_orm(),
        [samples.unique_orm() for _ in range(3)],
    )
    before = _refused("tls_handshake_failed")
    caplog.set_level(logging.WARNING, logger="connectors.hl7.mllp")
    tail = Tail(kafka_bootstrap, [s.topics.orders, s.topics.encounters, s.topics.deadletter])
    try:
        with ListenerThread(s) as lt:
            # A plain MLLP client on the TLS port: nothing accepted, connection closed.
            with socket.create_connection(("127.0.0.1", lt.port), timeout=30) as sock:
                sock.sendall(frame(plain_order))
                assert recv_eof(sock)
            # Garbage where the TLS hello should be, and a peer that never says anything.
            silent = socket.create_connection(("127.0.0.1", lt.port), timeout=30)
            with socket.create_connection(("127.0.0.1", lt.port), timeout=30) as sock:
                sock.sendall(bytes(range(256)) * 8 + frame(garbage_order))
                assert recv_eof(sock)
            # Neither stalls the listener: a TLS client with the test CA gets its AA...
            with _tls_connection(lt.port, _client_context(pki, cert=False)) as tls:
                tls.sendall(frame(tls_orders[0]))
                (ack,), _ = read_acks(tls, 1)
                assert check_ack(ack)[0] == "AA"
                # ...and garbage inside the TLS channel is dropped like junk between frames.
                tls.sendall(b"\x00\xff not MLLP \x1c\r" + frame(tls_orders[1]))
                (ack,), _ = read_acks(tls, 1)
                assert check_ack(ack)[0] == "AA"
            # The silent peer is closed once its handshake time is up.
            assert recv_eof(silent, timeout=30)
            silent.close()
            # A client that does not trust our certificate gives up itself.
            with pytest.raises(ssl.SSLCertVerificationError):
                with _tls_connection(lt.port, _client_context(pki, cert=False, ca=pki.other_ca)):
                    pass
            with _tls_connection(lt.port, _client_context(pki, cert=False)) as tls:
                tls.sendall(frame(tls_orders[2]))
                (ack,), _ = read_acks(tls, 1)
                assert check_ack(ack)[0] == "AA"
            want = {parse_accession(o) for o in tls_orders}
            tail.until(lambda: want <= set(_orders(tail, s)))
            tail.drain(2.0)
    finally:
        tail.close()
    assert sorted(_orders(tail, s)) == sorted(want) and len(tail.records) == 3
    # plain, garbage, silent, and the client that rejected our certificate.
    assert _refused("tls_handshake_failed") - before == 4
    assert caplog.text.count("handshake failed") == 4
    for order in (plain_order, garbage_order):
        assert parse_accession(order) not in caplog.text


def test_mutual_tls_and_allow_list_together(kafka_bootstrap: str, tmp_path: Path, pki: Pki) -> None:
    s = hl7_settings(kafka_bootstrap, tmp_path)
    s.hl7.allowed_sources = [parse_network("127.0.0.1")]
    s.hl7.tls = TlsSettings(
        enabled=True, cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca
    )
    order = samples.unique_orm()
    before = {r: _refused(r) for r in ("tls_handshake_failed", "source_not_allowed")}
    other = ssl.create_default_context(cafile=str(pki.ca))
    other.load_cert_chain(pki.other_client_cert, pki.other_client_key)
    tail = Tail(kafka_bootstrap, [s.topics.orders, s.topics.encounters, s.topics.deadletter])
    try:
        with ListenerThread(s) as lt:
            # No client certificate, or one from a CA we do not trust: refused in the
            # handshake (TLS 1.3 tells the client only at its first read).
            for context in (_client_context(pki, cert=False), other):
                try:
                    with _tls_connection(lt.port, context) as tls:
                        tls.sendall(frame(order))
                        assert tls.recv(100) == b""
                except (ssl.SSLError, ConnectionResetError):
                    pass
            # The right certificate, but from a source not allowed: closed before any TLS.
            with socket.socket() as raw:
                raw.bind(("127.0.0.2", 0))
                raw.settimeout(30)
                raw.connect(("127.0.0.1", lt.port))
                with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
                    _client_context(pki).wrap_socket(raw, server_hostname="127.0.0.1")
            # The right certificate from an allowed source: AA.
            with _tls_connection(lt.port, _client_context(pki)) as tls:
                tls.sendall(frame(order))
                (ack,), _ = read_acks(tls, 1)
                assert check_ack(ack)[0] == "AA"
            tail.until(lambda: parse_accession(order) in _orders(tail, s))
            tail.drain(2.0)
    finally:
        tail.close()
    assert _orders(tail, s) == [parse_accession(order)]
    assert _refused("tls_handshake_failed") - before["tls_handshake_failed"] == 2
    assert _refused("source_not_allowed") - before["source_not_allowed"] == 1


def test_unusable_tls_settings_stop_the_start(tmp_path: Path, pki: Pki) -> None:
    s = Settings(home=tmp_path)
    s.hl7.bind_address, s.hl7.port = "127.0.0.1", 0
    s.hl7.tls = TlsSettings(enabled=True, cert_file=pki.server_cert, key_file=pki.client_key)
    # Before anything listens or connects to Kafka.
    with pytest.raises(TlsConfigError, match=r"hl7\.tls: cannot use certificate"):
        Hl7Listener(s)
