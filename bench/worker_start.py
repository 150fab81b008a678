"""Worker start and the SEG map's cost on the alert's path (issue 17 leftovers).

    python -m bench.worker_start --baseline /work/main          # this tree against another
    python -m bench.worker_start --baseline /work/main --runs 5 --skip-ready

Three measures, each of this tree and (`--baseline DIR`) another checkout of radtriage:

- **import**: `python -X importtime -c "import streams.agents"`, the cumulative time of
  that import (the worker's module loading, before any Kafka or Triton), `--runs` times
  each, alternating trees; and whether highdicom / pynetdicom were loaded.
- **ready**: from the worker process's start to its ready file (partitions assigned and
  every lane warm: radtriage/worker.py), no PACS destination configured, on a Kafka and a
  Triton of the bench's own (free ports, a temporary home), a fresh consumer group and
  fresh topics per start; one uncounted start first (Triton's models, the page cache).
- **map**: what the infer stage does with an ICH finding's localisation map between the
  finding built and the finding published when a destination wants a SEG: before, encode
  and write it (a thread hop, two fsyncs: `LocalBlobStore.put_localisation_map`); now,
  encode it and derive its URI (`localisation_map_uri`), the write after the publish.
  On the blob store in the temporary home.

Writes JSON to bench/results/worker-start-<timestamp>.json. Never run in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.lanes import own_stack_settings, start_services
from bench.output import stamped_path, write_json
from processors.localisation import LOCALISATION_OUTPUT, PlaneField, SeriesGeometry, SliceCrop
from processors.localisation_map import StoredMap, map_key, stored_map, to_bytes
from radtriage.blobstore import LocalBlobStore
from radtriage.settings import REPO_ROOT, Settings
from radtriage.stack.process import ServiceProcess
from radtriage.up import child_env
from radtriage.worker import ready_file

RESULTS = REPO_ROOT / "bench" / "results"
IMPORT_CODE = (
    "import sys, streams.agents; "
    "print('LOADED', ','.join(m for m in ('highdicom', 'pynetdicom') if m in sys.modules))"
)


def import_once(tree: Path) -> tuple[float, str]:
    """Seconds `import streams.agents` took (importtime's cumulative), and what it loaded."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", IMPORT_CODE],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    line = next(x for x in reversed(out.stderr.splitlines()) if x.rstrip().endswith("| streams.agents"))
    loaded = out.stdout.strip().removeprefix("LOADED").strip()
    return int(line.split("|")[1]) / 1e6, loaded


def summary(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 4),
        "median": round(statistics.median(values), 4),
        "max": round(max(values), 4),
    }


def ready_once(tree: Path, base: Settings, run: str) -> float:
    """Seconds from a worker's start (from `tree`) to its ready file, in a group of its own."""
    settings = base.model_copy(deep=True)
    settings.streams.app_id = f"radtriage-start-{run}"
    for name in type(settings.topics).model_fields:
        setattr(settings.topics, name, f"{getattr(settings.topics, name)}.{run}")
    ready_file(settings).unlink(missing_ok=True)
    env = child_env(settings) | {"PYTHONPATH": str(tree)}
    worker = ServiceProcess(
        f"worker-{run}",
        [sys.executable, "-m", "radtriage.cli", "worker"],
        settings.home / "logs" / f"worker-{run}.log",
        env=env,
        cwd=tree,
    )
    started = time.monotonic()
    worker.start()
    try:
        worker.wait_until(ready_file(settings).exists, 300, "the worker to be ready")
        return time.monotonic() - started
    finally:
        worker.stop()


def ich_map() -> StoredMap:
    """An ICH finding's map as the infer stage keeps it (16 x 24 x 24 cells)."""
    m = np.full((16, 24, 24), 0.05, dtype=np.float32)
    m[5:8, 10:14, 8:12] = 0.9
    geometry = SeriesGeometry(
        SliceCrop(0, 32, 16),
        tuple(5.0 * k for k in range(32)),
        tuple(range(1, 33)),
        PlaneField(0.0, 256.0, 0.0, 256.0),
    )
    kept = stored_map({LOCALISATION_OUTPUT: m}, geometry, True)
    assert kept is not None
    return kept


def map_path(home: Path, runs: int) -> dict[str, Any]:
    """Seconds between finding built and finding published spent on the map, before and now."""
    blobs = LocalBlobStore(home / "blobs")
    study = "1.2.826.0.1.3680043.8.498.7001"
    kept = ich_map()

    async def before(i: int) -> None:
        data = to_bytes(kept)
        await asyncio.to_thread(blobs.put_localisation_map, study, map_key(f"before/{i}"), data)

    async def now(i: int) -> None:
        to_bytes(kept)
        blobs.localisation_map_uri(study, map_key(f"now/{i}"))

    async def timed(step: Any) -> list[float]:
        out = []
        for i in range(runs):
            t = time.perf_counter()
            await step(i)
            out.append((time.perf_counter() - t) * 1000)
        return out

    async def both() -> tuple[list[float], list[float]]:
        await before(-1)  # the study's folders exist in both: not the first write's mkdir
        return await timed(before), await timed(now)

    b, n = asyncio.run(both())
    return {"runs": runs, "before_ms": summary(b), "now_ms": summary(n)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="another radtriage checkout to compare with")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ready-runs", type=int, default=3)
    ap.add_argument("--map-runs", type=int, default=200)
    ap.add_argument("--skip-ready", action="store_true", help="no Kafka/Triton: import and map only")
    args = ap.parse_args(argv)
    trees = {"this": REPO_ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    result: dict[str, Any] = {
        "bench": "worker_start",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "trees": {k: str(v) for k, v in trees.items()},
    }
    imports: dict[str, list[float]] = {k: [] for k in trees}
    loaded: dict[str, str] = {}
    for _ in range(args.runs):
        for name, tree in trees.items():
            seconds, loaded[name] = import_once(tree)
            imports[name].append(seconds)
    result["import_s"] = {k: summary(v) | {"loaded": loaded[k]} for k, v in imports.items()}
    print("import streams.agents (s):", json.dumps(result["import_s"]))

    with tempfile.TemporaryDirectory(prefix="radtriage-bench-start-") as tmp:
        home = Path(tmp)
        result["map"] = map_path(home, args.map_runs)
        print("map on the alert's path (ms):", json.dumps(result["map"]))
        if not args.skip_ready:
            base = own_stack_settings(home)
            base.telemetry.exporter = "none"
            with ExitStack() as stack:
                start_services(base, stack, home / "triton.log")
                ready_once(REPO_ROOT, base, f"warm-{int(time.time())}")
                ready: dict[str, list[float]] = {k: [] for k in trees}
                for i in range(args.ready_runs):
                    for name, tree in trees.items():
                        ready[name].append(ready_once(tree, base, f"{name}-{i}-{int(time.time())}"))
                result["ready_s"] = {k: summary(v) for k, v in ready.items()}
                print("start to ready (s):", json.dumps(result["ready_s"]))
    out = stamped_path(RESULTS, "worker-start")
    write_json(out, result)
    print(out)


if __name__ == "__main__":
    main()
