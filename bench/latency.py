"""End-to-end latency benchmark: study ready → ICH alert, against baselines measured in the same run.

    python -m bench.latency --runs 20            # starts its own local stack on free ports
    python -m bench.latency --runs 20 --running  # against `radtriage up` on the configured ports

Baselines, measured on the same machine in the same run, so the ratios mean something
on a noisy box: (a) one Kafka produce (acks=all) → consume round trip, (b) the model's
own work outside the pipeline — load the series, MONAI preprocessing, one Triton call.
The pipeline's ready→alert crosses Kafka four times (studies, requests, findings,
alerts) around (b), so ready→alert / (b + 4·a) is the pipeline's overhead factor.
Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from rich.console import Console
from rich.table import Table

from bench.kafka_read import read_from_end
from bench.lanes import own_stack_settings
from bench.output import stamped_path, write_json
from bench.summary import spread
from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from processors.model_inputs import prepare_input
from processors.triton_client import TritonModelClient
from radtriage.demo import CASES, OutputWatcher, run_case
from radtriage.kafka_clients import kafka_python_kwargs, kafka_python_producer_kwargs
from radtriage.settings import REPO_ROOT, Settings

console = Console()


def stats(xs: list[float]) -> dict[str, float]:
    return spread(xs, tail=0.95)


def kafka_round_trip_ms(settings: Settings, n: int) -> list[float]:
    topic = settings.topics.audit
    producer = KafkaProducer(linger_ms=0, **kafka_python_producer_kwargs(settings.kafka))
    consumer = KafkaConsumer(group_id=None, **kafka_python_kwargs(settings.kafka))
    read_from_end(consumer, [topic])
    out = []
    for i in range(n):
        marker = f"bench-{time.time_ns()}-{i}".encode()
        start = time.perf_counter()
        producer.send(topic, key=marker, value=b'{"bench": true}').get(10)
        found = False
        while not found:
            for recs in consumer.poll(timeout_ms=100).values():
                found = found or any(r.key == marker for r in recs)
        out.append((time.perf_counter() - start) * 1000)
    producer.close()
    consumer.close()
    return out


def model_work_ms(settings: Settings, n: int, workdir: Path) -> list[float]:
    rng = np.random.default_rng(7)
    ph = head_ct_phantom(rng, bleed=True, min_bleed_ml=5.0)
    files = write_ct_series(ph.hu, ph.spacing_zyx, workdir / "baseline")

    async def run() -> list[float]:
        client = TritonModelClient(
            settings.triton.grpc_url, settings.triton.timeout_s, settings.triton.grpc_auth_headers()
        )
        times = []
        try:
            for _ in range(n):
                start = time.perf_counter()
                tensor = prepare_input("ich_classifier", files).tensor
                await client.infer_probability("ich_classifier", tensor, priority=1)
                times.append((time.perf_counter() - start) * 1000)
        finally:
            await client.close()
        return times

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--running", action="store_true", help="use an already running stack")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = ap.parse_args()

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="radtriage-bench-") as tmp:
        settings = Settings()
        if not args.running:
            from radtriage.up import running_stack

            settings = own_stack_settings(Path(tmp) / "home")
            settings.telemetry.exporter = "none"
            stack.enter_context(running_stack(settings))

        bleed_case = CASES[0]
        watcher = OutputWatcher(settings)
        rng = np.random.default_rng(99)
        run_case(bleed_case, settings, watcher, rng, Path(tmp), 120, 0.0)  # warm-up: model load, JIT
        ready_to_alert, received_to_alert, send_s = [], [], []
        with console.status("sending bleed studies…") as status:
            for i in range(args.runs):
                status.update(f"sending bleed study {i + 1}/{args.runs}")
                o = run_case(bleed_case, settings, watcher, rng, Path(tmp), 120, 0.0)
                if o.ready_to_alert_ms is None:
                    raise SystemExit(f"run {i}: no alert ({o.dead_letter or 'timeout'})")
                ready_to_alert.append(o.ready_to_alert_ms)
                received_to_alert.append(o.received_to_alert_ms or 0.0)
                send_s.append(o.sent_s * 1000)
        watcher.close()
        kafka_rtt = kafka_round_trip_ms(settings, args.runs)
        model = model_work_ms(settings, args.runs, Path(tmp))

    k, m, r = stats(kafka_rtt), stats(model), stats(ready_to_alert)
    floor = m["p50"] + 4 * k["p50"]
    result: dict[str, Any] = {
        "benchmark": "ready_to_alert",
        "at": datetime.now(UTC).isoformat(),
        "runs": args.runs,
        "ready_to_alert_ms": r,
        "received_to_alert_ms": stats(received_to_alert),
        "dicom_send_ms": stats(send_s),
        "baseline_kafka_round_trip_ms": k,
        "baseline_model_work_ms": m,
        "ratio_ready_to_alert_over_floor_p50": r["p50"] / floor,
        "floor_definition": "model work p50 + 4 x Kafka round trip p50",
    }
    path = stamped_path(args.out, "latency")
    write_json(path, result)

    table = Table(title=f"radtriage latency, {args.runs} bleed studies")
    for col in ("measure", "p50 ms", "p95 ms", "max ms"):
        table.add_column(col)
    for name, s in (
        ("study ready → alert", r),
        ("first instance received → alert", result["received_to_alert_ms"]),
        ("DICOM send (C-STORE all + release)", result["dicom_send_ms"]),
        ("baseline: Kafka round trip", k),
        ("baseline: load + preprocess + Triton", m),
    ):
        table.add_row(name, f"{s['p50']:.0f}", f"{s['p95']:.0f}", f"{s['max']:.0f}")
    console.print(table)
    console.print(
        f"ready→alert is {result['ratio_ready_to_alert_over_floor_p50']:.2f}x its floor; wrote {path}"
    )


if __name__ == "__main__":
    main()
