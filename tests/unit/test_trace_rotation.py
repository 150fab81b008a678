"""The jsonl span exporter rotates its file by size, also with several writers at once."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from radtriage.tracing_sdk import JsonLinesSpanExporter, rotated_path, trace_files


def _provider(exporter: JsonLinesSpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _lines(paths: list[Path]) -> list[dict[str, object]]:
    out = []
    for p in paths:
        for line in p.read_text().splitlines():
            out.append(json.loads(line))  # a torn line would not parse
    return out


def test_rotates_past_the_size_and_keeps_the_backups(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    tracer = _provider(JsonLinesSpanExporter(path, max_bytes=4000, backups=2)).get_tracer("t")
    for i in range(200):
        with tracer.start_as_current_span(f"span-{i}"):
            pass
    files = trace_files(path, backups=2)
    assert files == [rotated_path(path, 2), rotated_path(path, 1), path]
    assert not rotated_path(path, 3).exists()  # the oldest were dropped
    assert all(p.stat().st_size <= 4000 for p in files)
    names = [str(d["name"]) for d in _lines(files)]
    # Oldest first across the files, and the newest span is last.
    assert names[-1] == "span-199"
    assert names == sorted(names, key=lambda n: int(n.split("-")[1]))


def test_concurrent_writers_lose_and_tear_no_line(tmp_path: Path) -> None:
    # Two exporters on one file stand for two processes of `radtriage up` (separate
    # descriptors, the same flock protocol).
    path = tmp_path / "traces.jsonl"
    per_writer = 150

    def write(tag: str) -> None:
        tracer = _provider(JsonLinesSpanExporter(path, max_bytes=6000, backups=50)).get_tracer(tag)
        for i in range(per_writer):
            with tracer.start_as_current_span(f"{tag}-{i}"):
                pass

    threads = [threading.Thread(target=write, args=(tag,)) for tag in ("a", "b")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    spans = _lines(trace_files(path, backups=50))
    assert len(spans) == 2 * per_writer
    assert len({str(d["name"]) for d in spans}) == 2 * per_writer
    assert len(trace_files(path, backups=50)) > 2  # it did rotate


def test_no_rotation_when_unlimited(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    tracer = _provider(JsonLinesSpanExporter(path, max_bytes=0)).get_tracer("t")
    for i in range(50):
        with tracer.start_as_current_span(f"s{i}"):
            pass
    assert trace_files(path, backups=3) == [path]
    assert len(_lines([path])) == 50
