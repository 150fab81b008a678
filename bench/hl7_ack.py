"""HL7 MLLP ACK latency: order sent → AA received, against baselines measured in the same run.

    python -m bench.hl7_ack                          # starts its own Kafka on free ports
    python -m bench.hl7_ack --bootstrap 127.0.0.1:9092
    python -m bench.hl7_ack --messages 1000 --connections 8

`radtriage hl7-listener` runs as its own process, exactly as deployed; the sender is
this process. Measured:
- ORM^O01 → ACK over one persistent MLLP connection, one message at a time (how an
  interface engine sends), `--messages` of them; and, with `--connections N`, the same
  number spread over N concurrent connections (throughput);
- baselines: one bare `EventPublisher.publish` (acks=all) of the same OrderEvent — the
  floor the listener cannot beat, since it answers only after that — and the parse
  alone (hl7apy), in this process.
Every accession is then counted on the orders topic: lost and duplicated must be 0.
Writes JSON to bench/results/hl7_ack-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer
from rich.console import Console
from rich.table import Table

from bench.kafka_read import read_from_start
from bench.output import stamped_path, write_json
from connectors.hl7.parse import Accepted, parse_message
from connectors.publisher import EventPublisher
from radtriage.kafka_admin import ensure_topics
from radtriage.kafka_clients import as_kafka_settings, kafka_python_kwargs
from radtriage.mllp_framing import frame
from radtriage.settings import REPO_ROOT, KafkaSettings, Settings
from schemas.orders import OrderEvent
from tests.data.hl7.samples import set_field, text
from tests.support.kafka import local_kafka
from tests.support.net import free_port

console = Console()
ORM = text("orm_o01_v2.5.hl7")


def percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)

    def p(q: float) -> float:
        return xs[min(len(xs) - 1, max(0, round(q * len(xs)) - 1))]

    return {
        "n": len(xs),
        "p50": statistics.median(xs),
        "p95": p(0.95),
        "p99": p(0.99),
        "mean": statistics.fmean(xs),
        "max": xs[-1],
    }


def orm(run: str, i: int) -> tuple[str, bytes]:
    accession = f"B{run}-{i:06d}"
    message = set_field(set_field(ORM, "MSH", 10, f"{run}{i:06d}"), "OBR", 18, accession)
    return accession, message.encode()


def read_ack(sock: socket.socket, buf: bytearray) -> bytes:
    while True:
        end = buf.find(b"\x1c\r")
        if end >= 0:
            ack = bytes(buf[1:end])
            del buf[: end + 2]
            return ack
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("listener closed the connection")
        buf += data


def send_all(port: int, messages: list[tuple[str, bytes]]) -> list[float]:
    """Send over one connection, one at a time; the latency (ms) of each ACK. Every ACK must be AA."""
    latencies = []
    buf = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for _, message in messages:
            start = time.perf_counter()
            sock.sendall(frame(message))
            ack = read_ack(sock, buf)
            latencies.append((time.perf_counter() - start) * 1000)
            if b"MSA|AA|" not in ack:
                raise SystemExit(f"not accepted: {ack!r}")
    return latencies


def concurrent(port: int, messages: list[tuple[str, bytes]], connections: int) -> tuple[list[float], float]:
    shares = [messages[i::connections] for i in range(connections)]
    results: list[list[float]] = [[] for _ in shares]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = send_all(port, shares[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return [x for r in results for x in r], elapsed


def baseline_publish(settings: Settings, event: OrderEvent, n: int) -> list[float]:
    publisher = EventPublisher(settings.kafka, timeout_s=10.0, client_id="bench-baseline")
    topic = settings.topics.orders + ".baseline"
    ensure_topics(settings.kafka, {topic: settings.kafka.partitions})
    out = []
    try:
        for i in range(n + 20):
            start = time.perf_counter()
            publisher.publish(
                topic, f"base-{i}", event, {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
            )
            if i >= 20:  # the first ones pay for the connection and metadata
                out.append((time.perf_counter() - start) * 1000)
    finally:
        publisher.close()
    return out


def baseline_parse(message: bytes, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        parse_message(message)
        out.append((time.perf_counter() - start) * 1000)
    return out


def count_on_topic(
    kafka: KafkaSettings | str, topic: str, expected: set[str], timeout: float = 60
) -> Counter[str]:
    consumer = KafkaConsumer(
        group_id=None, enable_auto_commit=False, **kafka_python_kwargs(as_kafka_settings(kafka))
    )
    read_from_start(consumer, [topic])
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    quiet_until = None
    while time.monotonic() < deadline:
        for recs in consumer.poll(timeout_ms=300).values():
            seen.update(r.key.decode() for r in recs)
        if expected <= set(seen):
            quiet_until = quiet_until or time.monotonic() + 2.0  # then look for duplicates
            if time.monotonic() > quiet_until:
                break
    consumer.close()
    return seen


def start_kafka(stack: ExitStack, tmp: Path) -> str:
    with console.status("starting Kafka…"):
        broker = stack.enter_context(local_kafka(tmp / "kafka"))
    return str(broker.bootstrap_servers)


def start_listener(stack: ExitStack, settings: Settings) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADTRIAGE_")}
    env.update(
        {
            "RADTRIAGE_HOME": str(settings.home),
            "RADTRIAGE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "RADTRIAGE_TOPICS__ORDERS": settings.topics.orders,
            "RADTRIAGE_TOPICS__ENCOUNTERS": settings.topics.encounters,
            "RADTRIAGE_TOPICS__DEADLETTER": settings.topics.deadletter,
            "RADTRIAGE_HL7__PORT": str(settings.hl7.port),
            "RADTRIAGE_HL7__BIND_ADDRESS": "127.0.0.1",
            # Spans are created as in production; exporting them is not what we measure.
            "RADTRIAGE_TELEMETRY__EXPORTER": "none",
        }
    )
    log = (settings.home / "hl7.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "radtriage.cli", "hl7-listener"],
        env=env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()

    stack.callback(stop)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(
                "hl7-listener did not start:\n" + (settings.home / "hl7.log").read_text()[-2000:]
            )
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", settings.hl7.port)) == 0:
                return
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", help="use this Kafka instead of starting one")
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument(
        "--connections", type=int, default=4, help="concurrent connections for the throughput run (0: skip)"
    )
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = ap.parse_args()

    run = datetime.now(UTC).strftime("%H%M%S")
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="radtriage-bench-hl7-") as tmp_name:
        tmp = Path(tmp_name)
        settings = Settings(home=tmp / "home")
        settings.home.mkdir(parents=True)
        settings.kafka.bootstrap_servers = args.bootstrap or start_kafka(stack, tmp)
        suffix = f"bench-{run}-{free_port()}"
        for name in ("orders", "encounters", "deadletter"):
            setattr(settings.topics, name, f"{getattr(settings.topics, name)}.{suffix}")
        settings.hl7.port = free_port()
        ensure_topics(
            settings.kafka,
            dict.fromkeys(
                (settings.topics.orders, settings.topics.encounters, settings.topics.deadletter),
                settings.kafka.partitions,
            ),
        )
        start_listener(stack, settings)

        warmup = [orm(f"W{run}", i) for i in range(30)]
        single = [orm(f"S{run}", i) for i in range(args.messages)]
        multi = [orm(f"M{run}", i) for i in range(args.messages)] if args.connections else []
        with console.status(f"warm-up, then {args.messages} ORMs over one connection…"):
            send_all(settings.hl7.port, warmup)
            started = time.perf_counter()
            one_conn = send_all(settings.hl7.port, single)
            one_conn_s = time.perf_counter() - started
        many_conn: list[float] = []
        many_s = 0.0
        if multi:
            with console.status(f"{args.messages} ORMs over {args.connections} concurrent connections…"):
                many_conn, many_s = concurrent(settings.hl7.port, multi, args.connections)
        outcome = parse_message(single[0][1])
        assert isinstance(outcome, Accepted) and isinstance(outcome.events[0], OrderEvent)
        with console.status("baselines: bare acks=all publish, parse alone…"):
            publish = baseline_publish(settings, outcome.events[0], args.messages)
            parse = baseline_parse(single[0][1], args.messages)
        with console.status("counting accessions on the orders topic…"):
            sent = {a for a, _ in warmup + single + multi}
            seen = count_on_topic(settings.kafka, settings.topics.orders, sent)
    lost = len(sent - set(seen))
    duplicated = sum(1 for a in sent if seen[a] > 1)

    rows: dict[str, dict[str, float]] = {
        "ORM → AA, 1 connection": percentiles(one_conn),
        "baseline: publish acks=all": percentiles(publish),
        "baseline: parse (hl7apy)": percentiles(parse),
    }
    if many_conn:
        rows[f"ORM → AA, {args.connections} connections"] = percentiles(many_conn)
    table = Table(title=f"HL7 MLLP ACK latency (ms), {args.messages} ORM^O01 v2.5 per run")
    for col in ("", "n", "p50", "p95", "p99", "mean", "max"):
        table.add_column(col, justify="left" if not col else "right")
    for name, st in rows.items():
        table.add_row(name, str(st["n"]), *(f"{st[k]:.2f}" for k in ("p50", "p95", "p99", "mean", "max")))
    console.print(table)
    throughput = {"1 connection": args.messages / one_conn_s}
    if many_conn:
        throughput[f"{args.connections} connections"] = args.messages / many_s
    ratio = rows["ORM → AA, 1 connection"]["p50"] / rows["baseline: publish acks=all"]["p50"]
    console.print(
        "throughput: " + ", ".join(f"{k} {v:.0f} msg/s" for k, v in throughput.items()),
        f"\nACK p50 / publish p50 = {ratio:.2f}",
        f"\ndelivered: {len(sent) - lost}/{len(sent)} accessions on {settings.topics.orders}, "
        f"lost {lost}, duplicated {duplicated}",
    )
    result: dict[str, Any] = {
        "benchmark": "hl7_ack",
        "at": datetime.now(UTC).isoformat(),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "kafka": "external" if args.bootstrap else "embedded (LocalKafka)",
        "messages": args.messages,
        "connections": args.connections,
        "latency_ms": rows,
        "throughput_msg_s": throughput,
        "sent": len(sent),
        "lost": lost,
        "duplicated": duplicated,
    }
    path = stamped_path(args.out, "hl7_ack")
    write_json(path, result)
    console.print(f"JSON: {path}")
    if lost or duplicated:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
