"""The OpenTelemetry SDK for radtriage's processes: the tracer provider and its exporter,
installed once per process by the commands (radtriage/cli.py, radtriage/worker.py).

Library code traces through the API only (radtriage/telemetry.py). The exporter is chosen
by configuration (`telemetry.exporter`: none, console, otlp, or jsonl — a local file that
`radtriage trace` reads, rotated by size).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

from radtriage import telemetry
from radtriage.settings import Settings

_configured = False


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a local JSON-lines file (one span per line), rotated by size.

    At ~90 KiB of spans per study an unrotated file fills a disk in weeks; past `max_bytes`
    the file becomes `<name>.1` (older ones shift up to `<name>.<backups>`, the oldest is
    dropped) and a new one is started. `radtriage trace` reads the backups too.
    """

    def __init__(self, path: Path, max_bytes: int = 0, backups: int = 3) -> None:
        self._path = path
        self._max_bytes, self._backups = max_bytes, backups
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(json.loads(s.to_json()), separators=(",", ":")) for s in spans]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        # Every process of `radtriage up` appends to the same file: one locked O_APPEND
        # write per batch, so lines of two processes never interleave mid-line.
        with self._lock:
            fd = self._open_locked()
            try:
                if (
                    self._max_bytes
                    and 0 < os.fstat(fd).st_size
                    and (os.fstat(fd).st_size + len(data) > self._max_bytes)
                ):
                    self._rotate()
                    os.close(fd)
                    fd = self._open_locked()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)  # closing releases the lock
        return SpanExportResult.SUCCESS

    def _open_locked(self) -> int:
        while True:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Another process may have rotated the file while we waited for its lock: then
            # this descriptor is the backup's, and the new file is the one to append to.
            try:
                if os.stat(self._path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _rotate(self) -> None:
        for n in range(self._backups - 1, 0, -1):
            older = rotated_path(self._path, n)
            if older.exists():
                os.replace(older, rotated_path(self._path, n + 1))
        if self._backups:
            os.replace(self._path, rotated_path(self._path, 1))
        else:
            self._path.unlink(missing_ok=True)

    def shutdown(self) -> None:
        return None


def rotated_path(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def trace_files(path: Path, backups: int) -> list[Path]:
    """The trace file and its existing backups, oldest first."""
    older = [rotated_path(path, n) for n in range(backups, 0, -1)]
    return [p for p in older if p.exists()] + [path]


def setup_tracing(settings: Settings, component: str) -> None:
    """Install the global tracer provider for this process (idempotent)."""
    global _configured
    if _configured:
        return
    _configured = True
    telemetry.configure(settings)
    resource = Resource.create(
        {"service.name": settings.telemetry.service_name, "service.instance.id": component}
    )
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter | None
    match settings.telemetry.exporter:
        case "none":
            exporter = None
        case "console":
            exporter = ConsoleSpanExporter()
        case "otlp":
            exporter = _otlp_exporter(settings)
        case "jsonl":
            exporter = JsonLinesSpanExporter(
                settings.trace_file, settings.telemetry.jsonl_max_bytes, settings.telemetry.jsonl_backups
            )
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)


def _otlp_exporter(settings: Settings) -> SpanExporter:
    endpoint = settings.telemetry.otlp_endpoint
    if settings.telemetry.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        # A plain-text collector address (http://) means no TLS; https:// or a bare host:port
        # is left to the exporter's own defaults (TLS unless told otherwise).
        return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=endpoint)


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()
