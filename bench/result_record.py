"""The `triage.results.fhir` record, before and after issue 20: bytes and CPU per record.

    python -m bench.result_record            # JSON to bench/results/result_record.json
    python -m bench.result_record --json     # JSON to stdout

The demo's bleed finding (a STAT code-stroke head CT: HL7 order, left side, a slice range;
a 2.25 UID, `DEMO…` accession and `DEMO-…` patient id as radtriage/demo.py writes them)
becomes a report record both ways, each with the `traceparent` header every record carries:

- envelope (schema 1, before): the `FhirResult` JSON envelope holding the Bundle, no
  radtriage headers;
- plain (schema 2, now): the Bundle itself as the value, the metadata in headers.

Bytes are the value plus every header's name and value (what the record adds to the log
before Kafka's own per-record and per-header overhead, a few varints each). CPU: the
median of `--repeat` encodes (Bundle dict -> value + headers) and reads (`read_result`,
which reads either), in microseconds; no Kafka involved.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.output import print_or_write
from processors.fhir_report import build_result_bundle
from radtriage.settings import REPO_ROOT
from schemas.findings import Finding, SliceRange
from schemas.results import FhirResult, ResultHeaders, read_result, result_record
from streams.routing import request_id
from tests.support.findings import finding

RESULTS = REPO_ROOT / "bench" / "results" / "result_record.json"
TRACEPARENT = ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
READY = datetime(2026, 12, 7, 14, 0, tzinfo=UTC)


def demo_bleed() -> Finding:
    study = "2.25.238410734286129743529107427375401843651"  # pydicom generate_uid's shape
    return finding(
        "ICH",
        0.97,
        study_uid=study,
        series_uid=study + ".1",
        accession_number="DEMO0123456789",
        patient_id="DEMO-DEMO0123456789",
        series_description="CT HEAD WO CONTRAST",
        rule_id="ct-head-noncontrast-ich",
        request_id=request_id(study, "ct-head-noncontrast-ich", READY),
        laterality="left",
        laterality_probability=0.91,
        slice_range=SliceRange(
            first_instance_number=12,
            last_instance_number=19,
            first_position_mm=-40.0,
            last_position_mm=-5.0,
            slices=8,
        ),
        ready_at=READY,
        inferred_at=READY + timedelta(milliseconds=380),
    )


def size(value: bytes, headers: list[tuple[str, bytes]]) -> dict[str, int]:
    header_bytes = sum(len(k.encode()) + len(v) for k, v in headers)
    return {"value": len(value), "headers": header_bytes, "total": len(value) + header_bytes}


def median_us(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return round(statistics.median(times), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="print the JSON instead of writing it")
    args = parser.parse_args()

    bleed = demo_bleed()
    bundle = build_result_bundle(bleed)
    meta = ResultHeaders(
        study_uid=bleed.study_uid,
        accession_number=bleed.accession_number,
        finding=bleed.finding,
        request_id=bleed.request_id,
        produced_at=bleed.inferred_at + timedelta(milliseconds=3),
    )

    def envelope() -> tuple[bytes, list[tuple[str, bytes]]]:
        old = FhirResult(**meta.model_dump(exclude={"schema_version", "content_type"}), bundle=bundle)
        return old.to_bytes(), [TRACEPARENT]

    def plain() -> tuple[bytes, list[tuple[str, bytes]]]:
        value, headers = result_record(bundle, meta)
        return value, [*headers, TRACEPARENT]

    formats: dict[str, Any] = {}
    for name, make in (("envelope_schema_1", envelope), ("plain_bundle_schema_2", plain)):
        value, headers = make()
        assert read_result(value, headers).bundle == bundle
        formats[name] = {
            "bytes": size(value, headers),
            "encode_us_median": median_us(make, args.repeat),
            "read_us_median": median_us(lambda v=value, h=headers: read_result(v, h), args.repeat),
        }
    before = formats["envelope_schema_1"]["bytes"]["total"]
    after = formats["plain_bundle_schema_2"]["bytes"]["total"]
    result = {
        "bench": "result_record",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
        "finding": "the demo's bleed (ICH, HL7 order, left side, slice range)",
        "bundle_entries": len(bundle["entry"]),
        "formats": formats,
        "total_bytes_change": after - before,
        "total_bytes_change_pct": round(100.0 * (after - before) / before, 2),
    }
    print_or_write(result, RESULTS, print_only=args.json)


if __name__ == "__main__":
    main()
