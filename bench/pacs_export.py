"""PACS export cost and latency (issue 18): what the pacs-export stage does per finding,
against a real Orthanc on the same box.

    python -m bench.pacs_export --slices 32 200 --runs 20 --json

Per series size: the source headers read from disk, the TID 1500 SR built and encoded
(processors/dicom_results.py), the key image and KOS built (processors/key_images.py):
CPU ms (process time) and bytes; then, per run, a new finding's SR read + built + C-STOREd
(streams/dicom_send.py) to Orthanc: wall ms from "finding in hand" to "Orthanc answered
success", p50/p99. Kafka's hop from the findings topic to the agent is not included (it
is the same few ms as for the report and the alert). Each run's finding has its own
request id, so every SR is a new instance for Orthanc.

Writes JSON to bench/results/pacs_export.json (or stdout with --json).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from bench.output import print_or_write, run_header
from models.dicom_writer import write_ct_series
from processors.dicom_results import build_sr, encode, read_headers
from processors.key_images import build_key_image, build_kos, key_slice
from radtriage.settings import REPO_ROOT, DicomDestination
from schemas.findings import Finding, SliceRange
from streams.dicom_send import c_store
from tests.support.findings import ich_result
from tests.support.orthanc import Orthanc

RESULTS = REPO_ROOT / "bench" / "results" / "pacs_export.json"


def _finding(study: str, series: str, sources: list[pydicom.Dataset], request: str) -> Finding:
    z = sorted(float(ds.ImagePositionPatient[2]) for ds in sources)
    first, last = len(z) // 3, len(z) // 2
    return ich_result(
        study,
        series,
        probability=0.93,
        request_id=request,
        slice_range=SliceRange(
            first_instance_number=None,
            last_instance_number=None,
            first_position_mm=z[first],
            last_position_mm=z[last],
            slices=last - first + 1,
        ),
    )


def _cpu_ms(run: Any, repeat: int = 5) -> tuple[float, Any]:
    """Median CPU ms of `run()` over `repeat` calls, and its last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.process_time()
        result = run()
        times.append((time.process_time() - start) * 1e3)
    return statistics.median(times), result


def measure(slices: int, runs: int, orthanc: Orthanc, work: Path) -> dict[str, Any]:
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    hu = np.random.default_rng(slices).normal(40.0, 10.0, (slices, 512, 512))
    files = write_ct_series(hu, (5.0, 0.45, 0.45), work / f"ct{slices}", study_uid=study, series_uid=series)
    orthanc.upload(files)
    headers_ms, sources = _cpu_ms(lambda: read_headers(files))
    finding = _finding(study, series, sources, "bench/0")
    sr_ms, sr_bytes = _cpu_ms(lambda: encode(build_sr(finding, sources)))
    key_ms, key = _cpu_ms(
        lambda: build_key_image(finding, pydicom.dcmread(key_slice(finding, sources).filename))
    )
    kos_ms, kos = _cpu_ms(lambda: build_kos(finding, [key]))
    destination = DicomDestination(
        name="bench", host="127.0.0.1", port=orthanc.dicom_port, ae_title=orthanc.aet
    )
    walls, cpus = [], []
    for i in range(runs):
        start, cpu = time.perf_counter(), time.process_time()
        run_sources = read_headers(files)
        sr = build_sr(_finding(study, series, run_sources, f"bench/{i + 1}"), run_sources)
        outcome = c_store(destination, sr, 30.0)
        walls.append((time.perf_counter() - start) * 1e3)
        cpus.append((time.process_time() - cpu) * 1e3)
        if not outcome.stored:
            raise RuntimeError(f"Orthanc did not store the SR: {outcome.status_text} {outcome.detail}")
    walls.sort()
    return {
        "slices": slices,
        "headers_cpu_ms": round(headers_ms, 1),
        "sr_build_encode_cpu_ms": round(sr_ms, 1),
        "sr_bytes": len(sr_bytes),
        "key_image_cpu_ms": round(key_ms, 1),
        "key_image_bytes": len(encode(key)),
        "kos_cpu_ms": round(kos_ms, 1),
        "kos_bytes": len(encode(kos)),
        "finding_to_sr_stored_ms": {
            "runs": runs,
            "p50": round(statistics.median(walls), 1),
            "p99": round(walls[min(len(walls) - 1, int(0.99 * len(walls)))], 1),
            "max": round(walls[-1], 1),
        },
        "finding_to_sr_stored_cpu_ms_p50": round(statistics.median(cpus), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, nargs="+", default=[32, 200])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="print the JSON instead of writing it")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="radtriage-bench-pacs-") as tmp:
        orthanc = Orthanc(Path(tmp) / "orthanc")
        orthanc.start()
        try:
            results = [measure(n, args.runs, orthanc, Path(tmp)) for n in args.slices]
        finally:
            orthanc.stop()
    print_or_write(run_header("pacs_export") | {"results": results}, RESULTS, print_only=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
