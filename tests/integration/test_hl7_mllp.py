"""The HL7 MLLP listener against a real Kafka and python-hl7's real `mllp_send`.

- `radtriage hl7-listener` (a subprocess, configured through RADTRIAGE_* variables)
  receives a file of valid and broken messages from `mllp_send`: an ACK per message
  with the right code, each valid order exactly once on the orders topic, each broken
  message exactly once on the dead-letter topic, no PHI on any topic, in the log or
  in the spans, and a clean stop on SIGTERM;
- Kafka unreachable: AR 207 "retry later", never AA;
- socket edge cases: pipelining, junk, oversized frames, idle connections,
  concurrency, a stop with messages in flight;
- robustness: thousands of hypothesis-generated malformed messages and framing abuse,
  each followed by a valid order, over real sockets: every answer a well-formed ACK
  with the code the parser predicts, nothing hangs, every valid order in Kafka once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hl7
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.hl7.ack import ack_code, outcome_ack
from connectors.hl7.mllp import Hl7Listener, start_listener
from connectors.hl7.parse import Accepted, Ignored, Rejected, oversized, parse_message
from connectors.publisher import EventPublisher
from radtriage.mllp_framing import Frame, FrameDecoder, Oversized, frame
from radtriage.settings import Settings
from schemas.orders import OrderEvent
from tests.data.hl7 import samples
from tests.support.kafka import TopicReader
from tests.support.loop import LoopThread
from tests.support.net import free_port
from tests.support.process import start_radtriage, wait_listening
from tests.support.settings import isolated_settings

pytestmark = pytest.mark.integration

MLLP_SEND = Path(sys.executable).parent / "mllp_send"
SB, EB, CR = b"\x0b", b"\x1c", b"\r"
PHI = [v.encode() for v in samples.phi_values()]

_ids = itertools.count(1)


# -- helpers -------------------------------------------------------------------------------


def hl7_settings(kafka_bootstrap: str, home: Path) -> Settings:
    """Settings with this test's own topics (a unique suffix) and home."""
    s = isolated_settings(home, kafka_bootstrap, ("orders", "encounters", "deadletter"), partitions=3)
    s.kafka.produce_timeout_s = 10.0
    s.hl7.port = free_port()
    s.hl7.bind_address = "127.0.0.1"
    s.telemetry.exporter = "none"
    return s


class Tail(TopicReader):
    """Every record of the given topics, from their beginning (the topics are this test's own)."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        super().__init__(bootstrap, topics, from_beginning=True)


def assert_no_phi(blob: bytes, where: str) -> None:
    leaked = [v.decode() for v in PHI if v in blob]
    assert not leaked, f"PHI {leaked} in {where}"


def read_acks(sock: socket.socket, n: int, timeout: float = 30.0) -> tuple[list[bytes], bool]:
    """`n` ACK frames from `sock` (strictly framed: nothing outside SB…EB CR), and whether
    the server closed the connection."""
    buf = b""
    acks: list[bytes] = []
    deadline = time.monotonic() + timeout
    closed = False
    while len(acks) < n:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no answer in {timeout}s: got {len(acks)} of {n} ACKs (listener hung?)"
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            data = b""
        if not data:
            closed = True
            break
        buf += data
        while buf:
            assert buf[:1] == SB, f"bytes outside an MLLP frame in the answer: {buf[:40]!r}"
            end = buf.find(EB + CR)
            if end < 0:
                break
            acks.append(buf[1:end])
            buf = buf[end + 2 :]
    assert not buf, "a partial ACK frame"
    return acks, closed


def recv_eof(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True if the peer closes the connection (without sending anything more) within `timeout`."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def check_ack(ack: bytes) -> tuple[str, str]:
    """Assert `ack` is a well-formed HL7 ACK; returns (MSA-1, MSA-2)."""
    text = ack.decode("latin-1")
    assert text.endswith("\r") and text.startswith("MSH"), text[:80]
    sep = text[3]
    segs = text.rstrip("\r").split("\r")
    assert segs[1].startswith(f"MSA{sep}"), segs
    msh = segs[0].split(sep)
    assert msh[8].split(msh[1][0])[0] == "ACK"
    msa = [*segs[1].split(sep), "", ""]
    parsed = hl7.parse(text)  # python-hl7 reads it too
    assert str(parsed.segment("MSA")[1]) == msa[1]
    assert msa[1] in ("AA", "AE", "AR", "CA", "CE", "CR"), msa
    if msa[1] not in ("AA", "CA"):
        assert any(s.startswith(f"ERR{sep}") for s in segs[2:]), segs
    return msa[1], msa[2]


class ListenerThread:
    """`start_listener` on its own event loop in a thread, for synchronous tests."""

    def __init__(self, settings: Settings, publisher: EventPublisher | None = None) -> None:
        self.settings, self.publisher = settings, publisher
        self.thread = LoopThread()
        self.listener: Hl7Listener | None = None

    def __enter__(self) -> ListenerThread:
        self.thread.start()
        self.listener = self.thread.run(start_listener(self.settings, self.publisher), 60)
        return self

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.port

    def stop(self) -> None:
        if self.listener is not None:
            self.thread.run(self.listener.stop(), 60)
            self.listener = None

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.thread.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def exchange(port: int, *messages: bytes) -> list[tuple[str, str]]:
    with connect(port) as sock:
        sock.sendall(b"".join(frame(m) for m in messages))
        acks, _ = read_acks(sock, len(messages))
    return [check_ack(a) for a in acks]


# -- mllp_send against `radtriage hl7-listener` -----------------------------------------------


@contextmanager
def cli_listener(s: Settings) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADTRIAGE_")}
    env.update(
        {
            "RADTRIAGE_HOME": str(s.home),
            "RADTRIAGE_KAFKA__BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers,
            "RADTRIAGE_KAFKA__PRODUCE_TIMEOUT_S": "10",
            "RADTRIAGE_TOPICS__ORDERS": s.topics.orders,
            "RADTRIAGE_TOPICS__ENCOUNTERS": s.topics.encounters,
            "RADTRIAGE_TOPICS__DEADLETTER": s.topics.deadletter,
            "RADTRIAGE_HL7__PORT": str(s.hl7.port),
            "RADTRIAGE_HL7__BIND_ADDRESS": "127.0.0.1",
            "RADTRIAGE_HL7__MAX_MESSAGE_BYTES": str(s.hl7.max_message_bytes),
            "RADTRIAGE_HL7__IDLE_TIMEOUT_S": str(s.hl7.idle_timeout_s),
            # Spans go to $RADTRIAGE_HOME/traces.jsonl (checked for PHI by the mllp_send test).
            "RADTRIAGE_TELEMETRY__EXPORTER": "jsonl",
        }
    )
    proc = start_radtriage(["hl7-listener"], env, s.home / "hl7.log")
    try:
        wait_listening(proc, s.hl7.port, s.home / "hl7.log")
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def mllp_send(port: int, file: Path, *extra: str) -> list[bytes]:
    """Run python-hl7's `mllp_send`; returns the ACK frames it printed, one per message."""
    result = subprocess.run(
        [str(MLLP_SEND), "--port", str(port), "--file", str(file), *extra, "127.0.0.1"],
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    # It prints each answer as received (SB … EB CR) followed by a newline.
    return re.findall(rb"\x0b(.*?)\x1c\r\n", result.stdout, re.S)


def test_mllp_send_valid_and_broken_messages(kafka_bootstrap: str, tmp_path: Path) -> None:
    s = hl7_settings(kafka_bootstrap, tmp_path)
    names = [*samples.VALID, *samples.IGNORED, *samples.INVALID]
    random.Random(7).shuffle(names)  # valid and broken interleaved
    # mllp_send's file format: messages separated by EB (it strips SB and CR around each).
    batch = tmp_path / "batch.hl7"
    batch.write_bytes(b"".join(SB + samples.load(n) + EB + CR for n in names))
    sent = {n: samples.load(n).strip(SB + CR) for n in names}

    # --loose: a plain text file, LF line ends, messages recognised by their MSH.
    loose = tmp_path / "loose.hl7"
    loose_orders = [samples.unique_orm(priority="A").decode() for _ in range(3)]
    loose.write_text("\n".join(m.replace("\r", "\n") for m in loose_orders))
    loose_accessions = [re.search(r"\|(ACC-T\d+)\|", m).group(1) for m in loose_orders]  # type: ignore[union-attr]

    tail = Tail(kafka_bootstrap, [s.topics.orders, s.topics.encounters, s.topics.deadletter])
    try:
        with cli_listener(s) as proc:
            acks = mllp_send(s.hl7.port, batch)
            assert len(acks) == len(names)
            for name, ack in zip(names, acks, strict=True):
                code, control_id = check_ack(ack)
                outcome = parse_message(samples.load(name))
                assert control_id == outcome.header.control_id, name
                if name in samples.INVALID:
                    assert code == samples.INVALID[name][0], (name, ack)
                    assert f"{samples.INVALID[name][1]}" in ack.decode(), ack
                elif name.startswith("omi"):
                    assert code == "CA", ack  # MSH-15 AL: enhanced mode
                else:
                    assert code == "AA", (name, ack)
            loose_acks = mllp_send(s.hl7.port, loose, "--loose")
            assert [check_ack(a)[0] for a in loose_acks] == ["AA"] * 3

            accessions = ["ACC-23-0001", "FL-24-0001", "ACC-24-0002", "ACC-25-0001", "ACC-251-0001"]
            accessions += loose_accessions
            patients = ["MRN500811", "MRN600922", "MRN700133"]
            tail.until(
                lambda: (
                    len(tail.of(s.topics.orders)) >= len(accessions)
                    and len(tail.of(s.topics.encounters)) >= len(patients)
                    and len(tail.of(s.topics.deadletter)) >= len(samples.INVALID)
                )
            )
            tail.drain(2.0)  # anything extra (a duplicate) would show up now

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, (s.home / "hl7.log").read_text()[-3000:]
    finally:
        tail.close()

    orders = tail.of(s.topics.orders)
    assert sorted(r.key.decode() for r in orders) == sorted(accessions)
    assert sorted(r.value["accession_number"] for r in orders) == sorted(accessions)
    for r in orders:
        assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", r.headers["traceparent"]), r.headers
    stat = next(r.value for r in orders if r.key == b"ACC-23-0001")
    assert (stat["priority"], stat["priority_field"], stat["patient_class"]) == ("stat", "ORC-7", "emergency")
    encounters = tail.of(s.topics.encounters)
    assert sorted(r.key.decode() for r in encounters) == sorted(patients)

    letters = tail.of(s.topics.deadletter)
    assert len(letters) == len(samples.INVALID)
    by_sha = {json.loads(r.value["payload"])["sha256"]: r.value for r in letters}
    for name in samples.INVALID:
        digest = hashlib.sha256(sent[name]).hexdigest()
        letter = by_sha[digest]  # exactly one dead letter per broken message
        summary = json.loads(letter["payload"])
        assert letter["stage"] == "hl7.intake"
        assert letter["error"].startswith(samples.INVALID[name][0])
        assert summary["error_code"] == samples.INVALID[name][1]
        assert summary["size"] == len(sent[name])
        # The raw message is in the quarantine, and only there.
        quarantined = Path(summary["quarantine_uri"].removeprefix("file://"))
        assert quarantined.read_bytes() == sent[name]
        assert quarantined.parent == s.home / "quarantine" / "hl7"

    for r in tail.records:
        assert_no_phi(r.key + r.raw + b"".join(r.headers.values()), f"topic {r.topic}")
    assert_no_phi((s.home / "hl7.log").read_bytes(), "the listener's log")
    spans = [json.loads(line) for line in s.trace_file.read_text().splitlines()]
    receives = [sp for sp in spans if sp["name"] == "hl7.receive"]
    assert len(receives) == len(names) + 3
    assert {sp["attributes"]["hl7.ack_code"] for sp in receives} == {"AA", "AE", "AR", "CA"}
    assert {sp["kind"] for sp in receives} == {"SpanKind.SERVER"}
    assert_no_phi(s.trace_file.read_bytes(), "the spans")


# -- Kafka unavailable -------------------------------------------------------------------------


def test_kafka_unavailable_is_ar_207_never_aa(tmp_path: Path) -> None:
    s = Settings(home=tmp_path)
    s.hl7.port, s.hl7.bind_address = 0, "127.0.0.1"
    # A real producer pointed at a port where no broker listens.
    publisher = EventPublisher(f"127.0.0.1:{free_port()}", timeout_s=1.0, client_id="test-down")
    with ListenerThread(s, publisher) as lt:
        valid = samples.unique_orm(control_id="DOWN-1")
        broken = samples.load("invalid_orm_no_accession_v2.4.hl7")
        enhanced = samples.load("omi_o23_v2.5.1.hl7")
        with connect(lt.port) as sock:
            for message, expected in ((valid, "AR"), (broken, "AR"), (enhanced, "CR")):
                sock.sendall(frame(message))
                (ack,), closed = read_acks(sock, 1)
                assert not closed
                assert check_ack(ack)[0] == expected
                assert re.search(rb"207[&^]Application internal error", ack), ack
                assert b"event log unavailable, retry later" in ack
    publisher.close()


# -- socket behaviour --------------------------------------------------------------------------


@pytest.fixture
def live(kafka_bootstrap: str, tmp_path: Path) -> Iterator[tuple[ListenerThread, Settings]]:
    s = hl7_settings(kafka_bootstrap, tmp_path)
    s.hl7.port = 0
    s.hl7.max_message_bytes = 32 * 1024
    s.hl7.idle_timeout_s = 1.5
    with ListenerThread(s) as lt:
        yield lt, s


def test_socket_edge_cases(live: tuple[ListenerThread, Settings]) -> None:
    lt, s = live
    orders = [samples.unique_orm() for _ in range(5)]
    with connect(lt.port) as sock:
        # Pipelined frames, junk around them, an EB without CR: answered in order.
        sock.sendall(
            b"\r\nGET / HTTP/1.0\r\n" + frame(orders[0]) + b"junk" + SB + orders[1] + EB + frame(orders[2])
        )
        acks, _ = read_acks(sock, 3)
        assert [check_ack(a) for a in acks] == [("AA", _control(o)) for o in orders[:3]]
        # A broken message, then a valid one: the connection stays open after an error.
        sock.sendall(frame(b"not hl7 at all"))
        (ack,), _ = read_acks(sock, 1)
        assert check_ack(ack)[0] == "AR"
        # An unfinished frame abandoned by a new start block: only the complete one answered.
        sock.sendall(SB + b"MSH|^~\\&|cut short" + frame(orders[3]))
        (ack,), _ = read_acks(sock, 1)
        assert check_ack(ack) == ("AA", _control(orders[3]))
        # Silent past the idle timeout: closed by the listener.
        time.sleep(s.hl7.idle_timeout_s + 1.0)
        assert sock.recv(10) == b""

    with connect(lt.port) as sock:
        # Larger than max_message_bytes: AR from its MSH, then the connection is closed.
        huge = samples.set_field(samples.text("orm_o01_v2.5.hl7"), "OBR", 13, "x" * (40 * 1024)).encode()
        try:
            sock.sendall(frame(huge) + frame(orders[4]))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the listener may close before the last bytes are sent
        acks, closed = read_acks(sock, 2)
        assert len(acks) == 1 and closed
        assert check_ack(acks[0]) == ("AR", "ORM25-0001")
        assert b"104^" in acks[0]

    # The listener is still fine, and answers on a new connection.
    assert exchange(lt.port, orders[4]) == [("AA", _control(orders[4]))]


def _control(message: bytes) -> str:
    """MSH-10 of one of our own (default-separator) messages."""
    return message.split(b"\r")[0].split(b"|")[9].decode()


def test_concurrent_connections_in_order_each_once(live: tuple[ListenerThread, Settings]) -> None:
    lt, s = live
    per_conn = {c: [samples.unique_orm() for _ in range(8)] for c in range(12)}
    results: dict[int, list[tuple[str, str]]] = {}

    def client(c: int) -> None:
        with connect(lt.port) as sock:
            got = []
            for m in per_conn[c]:  # one at a time, as an interface engine sends
                sock.sendall(frame(m))
                (ack,), _ = read_acks(sock, 1)
                got.append(check_ack(ack))
            results[c] = got

    threads = [threading.Thread(target=client, args=(c,)) for c in per_conn]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for c, messages in per_conn.items():
        assert results[c] == [("AA", _control(m)) for m in messages]
    expected = sorted(parse_accession(m) for ms in per_conn.values() for m in ms)
    tail = Tail(s.kafka.bootstrap_servers, [s.topics.orders])
    try:
        tail.until(lambda: len(tail.records) >= len(expected))
        tail.drain(1.0)
    finally:
        tail.close()
    assert sorted(r.key.decode() for r in tail.records) == expected


def parse_accession(message: bytes) -> str:
    outcome = parse_message(message)
    assert isinstance(outcome, Accepted) and isinstance(outcome.events[0], OrderEvent)
    return outcome.events[0].accession_number


def test_stop_answers_in_flight_messages_and_never_acks_what_is_not_stored(
    live: tuple[ListenerThread, Settings],
) -> None:
    lt, s = live
    port = lt.port
    messages = [samples.unique_orm() for _ in range(40)]
    with connect(port) as sock:
        sock.sendall(b"".join(frame(m) for m in messages))  # pipelined
        (first,), _ = read_acks(sock, 1)
        lt.stop()  # mid-stream
        rest, closed = read_acks(sock, len(messages) - 1, timeout=30)
        assert closed and len(rest) < len(messages) - 1  # it stopped before the end
    answered = [first, *rest]
    assert all(check_ack(a)[0] == "AA" for a in answered)
    acked = sorted(parse_accession(m) for m in messages[: len(answered)])
    tail = Tail(s.kafka.bootstrap_servers, [s.topics.orders])
    try:
        tail.until(lambda: len(tail.records) >= len(acked))
        tail.drain(1.0)
    finally:
        tail.close()
    in_kafka = {r.key.decode() for r in tail.records}
    assert set(acked) <= in_kafka  # every AA is in Kafka
    # The listener port is closed.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


# -- robustness --------------------------------------------------------------------------------

SEEDS = [samples.text(n) for n in (*samples.VALID, *samples.IGNORED, *samples.INVALID)]


def _segments(m: str) -> list[str]:
    return m.rstrip("\r").split("\r")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A malformed (or, by chance, still valid) HL7 message."""
    seed = draw(st.sampled_from(SEEDS))
    # A fresh accession and control id, so an accepted mutant is told apart in Kafka.
    n = next(_ids)
    # Fixed width: the seed's length (and so every later draw) must not depend on n.
    seed = seed.replace("ACC-", f"M{n:07d}-").replace("-0001|", f"-{n:07d}|")
    kind = draw(
        st.sampled_from(
            [
                "random",
                "truncate",
                "shuffle",
                "delete_field",
                "separators",
                "huge",
                "non_utf8",
                "splice",
                "dup",
            ]
        )
    )
    segs = _segments(seed)
    if kind == "random":
        return draw(st.binary(max_size=600))
    if kind == "truncate":
        return seed.encode()[: draw(st.integers(0, len(seed)))]
    if kind == "shuffle":
        return "\r".join(draw(st.permutations(segs))).encode()
    if kind == "delete_field":
        i = draw(st.integers(0, len(segs) - 1))
        fields = segs[i].split("|")
        j = draw(st.integers(0, len(fields) - 1))
        segs[i] = "|".join(fields[:j] + fields[j + 1 :])
        return "\r".join(segs).encode()
    if kind == "separators":
        old = draw(st.sampled_from(["\r", "|", "^", "~", "&", "\\"]))
        new = draw(st.sampled_from(["\n", "\t", "\x00", " ", "|", "^", ";", "#", "\r\n", ""]))
        return seed.replace(old, new).encode()
    if kind == "huge":
        i = draw(st.integers(0, len(segs) - 1))
        size = draw(st.sampled_from([1_000, 20_000, 40_000]))
        segs[i] += "|" + draw(st.sampled_from(["X", "^", "~", "\\", "\\X41\\"])) * size
        return "\r".join(segs).encode()
    if kind == "non_utf8":
        raw = bytearray(seed.encode())
        for _ in range(draw(st.integers(1, 8))):
            raw.insert(draw(st.integers(0, len(raw))), draw(st.integers(0x80, 0xFF)))
        return bytes(raw)
    if kind == "splice":
        data = seed.encode()
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=40)) + data[at:]
    return (seed + seed).encode()  # two messages in one frame


@st.composite
def framed(draw: st.DrawFn, payload: bytes) -> bytes:
    """`payload` inside MLLP framing, possibly abused."""
    style = draw(
        st.sampled_from(
            ["normal", "normal", "no_cr", "junk_before", "restart", "unterminated", "raw", "double"]
        )
    )
    if style == "normal":
        return frame(payload)
    if style == "no_cr":
        return SB + payload + EB
    if style == "junk_before":
        return draw(st.binary(max_size=30)).replace(SB, b"") + frame(payload)
    if style == "restart":
        return SB + draw(st.binary(max_size=30)).replace(SB, b"").replace(EB, b"") + frame(payload)
    if style == "unterminated":
        return SB + payload  # the next frame's start block abandons it
    if style == "raw":
        return payload
    return frame(payload) + frame(payload)


@dataclass
class Expected:
    probes: list[str] = field(default_factory=list)  # accessions of the interleaved valid orders
    accepted: list[str] = field(default_factory=list)  # accessions of mutants that were accepted
    dead_letters: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    examples: int = 0


def predicted_code(payload: bytes, item: Frame | Oversized, max_bytes: int) -> tuple[str, str, Any]:
    outcome = oversized(item.prefix, max_bytes) if isinstance(item, Oversized) else parse_message(payload)
    kind, _ = outcome_ack(outcome)
    return ack_code(outcome.header, kind), outcome.header.control_id, outcome


def test_hypothesis_malformed_input_over_real_sockets(kafka_bootstrap: str, tmp_path: Path) -> None:
    s = hl7_settings(kafka_bootstrap, tmp_path)
    s.hl7.max_message_bytes = 32 * 1024
    expected = Expected()
    port = s.hl7.port

    # `radtriage hl7-listener` in its own process: its own core, and "no crash" is checked
    # on the real thing (it must still be running, and stop cleanly, at the end).
    with cli_listener(s) as proc:

        @settings(
            max_examples=int(os.environ.get("HL7_FUZZ_EXAMPLES", "3000")),
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(data=st.data())
        def one(data: st.DataObject) -> None:
            payload = data.draw(mutated())
            n = next(_ids)
            accession, control_id = f"ACC-P{n:07d}", f"P{n:09d}"
            probe = samples.unique_orm(accession=accession, control_id=control_id)
            stream = data.draw(framed(payload)) + frame(probe)
            # What a correct listener answers: the frame decoder (unit-tested on its own)
            # says which frames the stream holds; the parser says each one's ACK code.
            items = [
                i
                for i in FrameDecoder(s.hl7.max_message_bytes).feed(stream)
                if isinstance(i, Frame | Oversized)
            ]
            cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=4))))
            with connect(port) as sock:
                try:
                    for a, b in itertools.pairwise([0, *cuts, len(stream)]):
                        sock.sendall(stream[a:b])
                except (BrokenPipeError, ConnectionResetError):
                    assert any(isinstance(i, Oversized) for i in items)
                acks, closed = read_acks(sock, len(items))
                if isinstance(items[-1], Oversized) and not closed:
                    # After refusing an oversized frame the listener closes the connection.
                    closed = recv_eof(sock)
            assert len(acks) == len(items), (len(acks), items[:3])
            for ack, item in zip(acks, items, strict=True):
                got = check_ack(ack)
                if item == Frame(probe):
                    assert got == ("AA", control_id)
                    expected.codes["AA"] += 1
                    continue
                payload_i = item.payload if isinstance(item, Frame) else b""
                code, control, outcome = predicted_code(payload_i, item, s.hl7.max_message_bytes)
                assert got == (code, control), (got, code, control, payload_i[:200])
                expected.codes[code] += 1
                if isinstance(outcome, Rejected):
                    expected.dead_letters += 1
                elif isinstance(outcome, Accepted):
                    expected.accepted += [
                        e.accession_number for e in outcome.events if isinstance(e, OrderEvent)
                    ]
                else:
                    assert isinstance(outcome, Ignored)
            if isinstance(items[-1], Oversized):
                # The listener closed after the oversized frame: the probe goes on a new connection.
                assert closed
                assert exchange(port, probe) == [("AA", control_id)]
            else:
                assert items[-1] == Frame(probe)
            expected.probes.append(accession)
            expected.examples += 1

        started = time.monotonic()
        one()
        elapsed = time.monotonic() - started
        assert proc.poll() is None, "the listener died"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0

    print(f"\n{expected.examples} examples in {elapsed:.0f}s; ACK codes {dict(expected.codes)}")
    assert expected.examples >= int(os.environ.get("HL7_FUZZ_EXAMPLES", "3000"))
    assert expected.codes["AR"] > 0 and expected.codes["AE"] > 0 and expected.codes["AA"] > 0
    assert_no_phi((s.home / "hl7.log").read_bytes(), "the listener's log")

    tail = Tail(kafka_bootstrap, [s.topics.orders, s.topics.encounters, s.topics.deadletter])
    try:
        tail.until(
            lambda: (
                len(tail.of(s.topics.orders)) >= len(expected.probes) + len(expected.accepted)
                and len(tail.of(s.topics.deadletter)) >= expected.dead_letters
            ),
            timeout=120,
        )
        tail.drain(2.0)
    finally:
        tail.close()
    keys = Counter(r.key.decode() for r in tail.of(s.topics.orders))
    assert all(keys[a] == 1 for a in expected.probes), "a valid order lost or duplicated"
    assert all(keys[a] >= 1 for a in expected.accepted), "an accepted mutant is not in Kafka"
    assert len(tail.of(s.topics.deadletter)) == expected.dead_letters
    for r in tail.records:
        assert_no_phi(r.key + r.raw, f"topic {r.topic}")
