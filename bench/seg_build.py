"""DICOM SEG build cost (issue 18): time and memory to build the SEG of an ICH finding
(processors/dicom_seg.py) on real-shaped head CTs, against the SR of the same finding
built in the same run (the baseline: what pacs-export already does per finding).

    python -m bench.seg_build --json

Per series (a 0.625 mm thin series of --thin-slices 512 x 512 slices and the 5 mm axial
series of one realistic study, models/realistic_study.py): the geometry the ICH
preprocessing really produces for it (load_series with the model's pooling, then
preprocess_head_ct_with_field: not timed), a blood map with a large bleed (map slices
--bleed-first..--bleed-last above the threshold, a 6 x 6-cell patch: ~50 x 50 mm), then,
each in a fresh process so its peak RSS (VmHWM) is its own: the source headers read, the
SR built and encoded, the SEG built (map read back from its bytes) and encoded. Reported:
wall ms, CPU ms, VmHWM and its rise over the process after imports and header read,
tracemalloc peak of the build (Python and numpy allocations), bytes, SEG frames.

Writes JSON to bench/results/seg_build.json (or stdout with --json).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from bench.output import print_or_write
from bench.proc_status import status_kb
from radtriage.settings import REPO_ROOT

RESULTS = REPO_ROOT / "bench" / "results" / "seg_build.json"


def _geometry(files: list[Path]) -> Any:
    """The SeriesGeometry the served ICH preprocessing gives this series."""
    from processors.model_inputs import HEAD_CT

    volume = HEAD_CT.load(files)
    _, geometry = HEAD_CT.preprocess(volume)
    return geometry


def _warm_up() -> None:
    """Build an SR and a SEG of a 4-slice series once: highdicom and pydicom import and
    fill their tables lazily (~1 s and ~100 MB on first use), once per process."""
    from models.dicom_writer import write_ct_series
    from processors.dicom_results import build_sr, encode, read_headers
    from processors.dicom_seg import build_seg
    from processors.localisation import LOCALISATION_OUTPUT, PlaneField, SeriesGeometry, SliceCrop, localise
    from processors.localisation_map import stored_map
    from tests.support.findings import ich_result

    with tempfile.TemporaryDirectory() as tmp:
        study, series = "1.2.826.0.1.3680043.8.498.9", "1.2.826.0.1.3680043.8.498.9.1"
        files = write_ct_series(
            np.full((4, 16, 16), 40.0), (5.0, 1.0, 1.0), Path(tmp), study_uid=study, series_uid=series
        )
        sources = read_headers(files)
        z = tuple(sorted(float(ds.ImagePositionPatient[2]) for ds in sources))
        geometry = SeriesGeometry(SliceCrop(0, 4, 16), z, (1, 2, 3, 4), PlaneField(0, 16, 0, 16))
        maps = {LOCALISATION_OUTPUT: np.full((16, 24, 24), 0.9, dtype=np.float32)}
        finding = ich_result(
            study, series, slice_range=localise(maps, geometry, True), localisation_map_uri="x"
        )
        encode(build_sr(finding, sources))
        encode(build_seg(finding, sources, stored_map(maps, geometry, True)))


def _measure(what: str, files: list[str], map_bytes: bytes, finding_json: bytes) -> dict[str, Any]:
    """In a fresh process, warmed up: read the headers, then build (and encode) `what` once."""
    from processors.dicom_results import build_sr, encode, read_headers
    from processors.dicom_seg import build_seg
    from processors.localisation_map import from_bytes
    from schemas.findings import Finding

    _warm_up()
    finding = Finding.from_bytes(finding_json)
    sources = read_headers([Path(f) for f in files])
    base_hwm = status_kb("VmHWM")
    tracemalloc.start()
    wall, cpu = time.perf_counter(), time.process_time()
    if what == "sr":
        data = encode(build_sr(finding, sources))
        frames = 0
    else:
        seg = build_seg(finding, sources, from_bytes(map_bytes))
        frames = int(seg.NumberOfFrames)
        data = encode(seg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    hwm = status_kb("VmHWM")
    return {
        "object": what,
        "wall_ms": round(wall * 1000, 1),
        "cpu_ms": round(cpu * 1000, 1),
        "bytes": len(data),
        "frames": frames,
        "tracemalloc_peak_mb": round(peak / 2**20, 1),
        "vmhwm_mb": round(hwm / 1024, 1),
        "vmhwm_rise_mb": round((hwm - base_hwm) / 1024, 1),
    }


def _in_child(what: str, files: list[str], map_bytes: bytes, finding_json: bytes) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_measure, (what, files, map_bytes, finding_json))  # type: ignore[no-any-return]


def run_series(name: str, files: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    from processors.localisation import LOCALISATION_OUTPUT, localise
    from processors.localisation_map import stored_map, to_bytes
    from tests.support.findings import ich_result

    geometry = _geometry(files)
    m = np.full((16, 24, 24), 0.05, dtype=np.float32)
    m[args.bleed_first : args.bleed_last + 1, 8:14, 12:18] = 0.9
    maps = {LOCALISATION_OUTPUT: m}
    import pydicom

    head = pydicom.dcmread(files[0], stop_before_pixels=True)
    finding = ich_result(
        str(head.StudyInstanceUID),
        str(head.SeriesInstanceUID),
        slice_range=localise(maps, geometry, True),
        localisation_map_uri="file:///bench",
    )
    kept = stored_map(maps, geometry, True)
    assert kept is not None and finding.slice_range is not None
    paths = [str(f) for f in files]
    runs = {
        what: [_in_child(what, paths, to_bytes(kept), finding.to_bytes()) for _ in range(args.runs)]
        for what in ("sr", "seg")
    }
    return {
        "series": name,
        "slices": len(files),
        "matrix": [int(head.Rows), int(head.Columns)],
        "slice_range_slices": finding.slice_range.slices,
        "map_bytes": len(to_bytes(kept)),
        "field_px": [
            geometry.field.row_start,
            geometry.field.row_stop,
            geometry.field.col_start,
            geometry.field.col_stop,
        ],
        "runs": runs,
        "median": {
            what: {
                key: float(np.median([r[key] for r in rs]))
                for key in (
                    "wall_ms",
                    "cpu_ms",
                    "bytes",
                    "frames",
                    "tracemalloc_peak_mb",
                    "vmhwm_mb",
                    "vmhwm_rise_mb",
                )
            }
            for what, rs in runs.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thin-slices", type=int, default=280)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bleed-first", type=int, default=4)
    parser.add_argument("--bleed-last", type=int, default=11)
    parser.add_argument("--json", action="store_true", help="print the JSON instead of writing it")
    args = parser.parse_args()
    from models.realistic_study import write_realistic_head_study

    with tempfile.TemporaryDirectory() as tmp:
        study = write_realistic_head_study(
            Path(tmp),
            bleed=True,
            rng=np.random.default_rng(1818),
            include=("axial", "thin"),
            thin_slices=args.thin_slices,
        )
        results = [
            run_series("thin 0.625 mm", list(study.of("thin").files), args),
            run_series("axial 5 mm", list(study.of("axial").files), args),
        ]
    doc = {
        "bench": "seg_build",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "bleed_map_slices": [args.bleed_first, args.bleed_last],
        "results": results,
    }
    print_or_write(doc, RESULTS, print_only=args.json, echo=False)


if __name__ == "__main__":
    main()
