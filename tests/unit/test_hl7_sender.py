"""Sending an ORU over MLLP (streams/hl7_sender.py) to a real receiver of our own
(tests/support/mllp_receiver.py): AA delivered, AE refused with its reason and not
retried, silence and a closed port retried to the deadline, a receiver that comes up
late still gets the message."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from datetime import UTC, datetime
from pathlib import Path

from processors.hl7_oru import Endpoint, build_oru, control_id, strict_parse
from radtriage.settings import ClientTlsSettings
from radtriage.tls import client_context
from streams.hl7_sender import Delivered, NoAnswer, Peer, Refused, deliver, exchange
from streams.retry import Retry, Undelivered
from tests.certs import make_pki
from tests.support.findings import finding
from tests.support.mllp_receiver import MllpReceiver

FINDING = finding()
PAYLOAD = build_oru(FINDING, Endpoint(receiving_application="RIS"), datetime(2026, 11, 24, 12, 1, tzinfo=UTC))
CID = control_id(FINDING)
QUICK = Retry(deadline_s=1.5, initial_s=0.05, max_s=0.2)


def send_to(port: int, ack_timeout_s: float = 2.0) -> object:
    peer = Peer("127.0.0.1", port)
    return asyncio.run(deliver(lambda: exchange(peer, PAYLOAD.encode(), CID, ack_timeout_s), QUICK))


def test_an_aa_is_delivered_and_the_receiver_has_a_strictly_valid_oru() -> None:
    with MllpReceiver() as ris:
        outcome = send_to(ris.port)
    assert isinstance(outcome, Delivered) and outcome.attempts == 1 and outcome.ack.code == "AA"
    (message,) = ris.received()
    assert message == PAYLOAD
    strict_parse(message)


def test_an_ae_is_refused_with_its_reason_and_not_sent_again() -> None:
    with MllpReceiver(lambda m: ("AE", "PID-3 unknown patient")) as ris:
        outcome = send_to(ris.port)
    assert isinstance(outcome, Refused)
    assert (outcome.ack.code, outcome.ack.reason, outcome.attempts) == ("AE", "PID-3 unknown patient", 1)
    assert len(ris.received()) == 1


def test_silence_is_retried_to_the_deadline_then_undelivered() -> None:
    with MllpReceiver(lambda m: None) as ris:
        outcome = send_to(ris.port, ack_timeout_s=0.2)
    assert isinstance(outcome, Undelivered)
    assert "no ACK within 0.2 s" in outcome.reason and outcome.attempts >= 2
    # Every attempt is the same message (the same MSH-10), on a connection of its own.
    assert set(ris.received()) == {PAYLOAD} and ris.connections == outcome.attempts


def test_a_closed_port_is_retried_and_a_receiver_that_comes_up_gets_it_once() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    outcome = send_to(port)
    assert isinstance(outcome, Undelivered) and "cannot connect" in outcome.reason

    # A receiver that starts on that port while the sender is backing off is reached by a
    # later attempt (the port is closed until then: the first attempts are refused).
    started: list[MllpReceiver] = []
    starter = threading.Timer(0.5, lambda: started.append(MllpReceiver(port=port).__enter__()))
    starter.start()
    try:
        outcome = asyncio.run(
            deliver(
                lambda: exchange(Peer("127.0.0.1", port), PAYLOAD.encode(), CID, 1.0),
                Retry(deadline_s=10, initial_s=0.1, max_s=0.2),
            )
        )
    finally:
        starter.join()
        for receiver in started:
            receiver.__exit__(None, None, None)
    assert isinstance(outcome, Delivered) and outcome.attempts >= 2
    assert started[0].received() == [PAYLOAD]


def test_an_ack_for_another_message_is_no_answer() -> None:
    with MllpReceiver() as ris:
        try:
            asyncio.run(exchange(Peer("127.0.0.1", ris.port), PAYLOAD.encode(), "SOMETHING-ELSE", 2.0))
        except NoAnswer as exc:
            assert "not 'SOMETHING-ELSE'" in str(exc)
        else:
            raise AssertionError("an ACK of another control id was taken")


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [Retry(60, 1, 8).delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]


def test_over_mutual_tls_only_a_receiver_our_ca_signed_is_sent_to(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server_cert, pki.server_key)
    server.load_verify_locations(cafile=str(pki.ca))
    server.verify_mode = ssl.CERT_REQUIRED  # the receiver wants our certificate too
    ours = ClientTlsSettings(enabled=True, ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    with MllpReceiver(tls=server) as ris:
        peer = Peer("127.0.0.1", ris.port, client_context(ours, "ehr.hl7.tls"))
        outcome = asyncio.run(deliver(lambda: exchange(peer, PAYLOAD.encode(), CID, 2.0), QUICK))
        assert isinstance(outcome, Delivered) and ris.received() == [PAYLOAD]
        # A receiver whose certificate another CA signed is never sent the result.
        other = ClientTlsSettings(enabled=True, ca_file=pki.other_ca)
        stranger = Peer("127.0.0.1", ris.port, client_context(other, "ehr.hl7.tls"))
        outcome = asyncio.run(deliver(lambda: exchange(stranger, PAYLOAD.encode(), CID, 2.0), QUICK))
    assert isinstance(outcome, Undelivered) and "CERTIFICATE_VERIFY_FAILED" in outcome.reason
    assert ris.received() == [PAYLOAD]
