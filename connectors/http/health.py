"""`GET /healthz`: can this process take work right now?

Checks are cheap and fresh: a TCP connection to a Kafka bootstrap server, the outcome
of the most recent publish (a failure in the last 30 s counts until a success follows),
and that the blob store's directory is writable. 200 when all pass, 503 otherwise.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from connectors.http.state import BLOBS, PUBLISHER, SETTINGS

PROBE_TIMEOUT_S = 2.0
PUBLISH_FAILURE_WINDOW_S = 30.0


def bootstrap_addresses(bootstrap: str) -> list[tuple[str, int]]:
    """host:port pairs of a bootstrap list ('a:9092,PLAINTEXT://b:9093', '[::1]:9092')."""
    out = []
    for item in bootstrap.split(","):
        item = item.strip().split("://", 1)[-1]
        host, _, port = item.rpartition(":")
        if host and port.isdigit():
            out.append((host.strip("[]"), int(port)))
    return out


async def kafka_reachable(bootstrap: str, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    for host, port in bootstrap_addresses(bootstrap):
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except (OSError, TimeoutError):
            continue
        writer.close()
        return True, f"{host}:{port} accepts connections"
    return False, f"no bootstrap server of {bootstrap!r} accepts connections"


def blob_store_writable(root: Path) -> tuple[bool, str]:
    # The store creates its directory on first write: the nearest existing ancestor counts.
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    ok = probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)
    return ok, "writable" if ok else f"{probe} is not a writable directory"


async def healthz(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    publisher = request.app[PUBLISHER]
    reachable, kafka_detail = await kafka_reachable(settings.kafka.bootstrap_servers)
    failing = publisher.state.failing(time.monotonic(), PUBLISH_FAILURE_WINDOW_S)
    kafka_ok = reachable and not failing
    if reachable and failing:
        kafka_detail = f"last publish failed: {publisher.state.failure}"
    blobs_ok, blobs_detail = blob_store_writable(request.app[BLOBS].root)
    checks: dict[str, Any] = {
        "kafka": {"status": "ok" if kafka_ok else "failing", "detail": kafka_detail},
        "blob_store": {"status": "ok" if blobs_ok else "failing", "detail": blobs_detail},
    }
    ok = kafka_ok and blobs_ok
    return web.json_response(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503
    )
