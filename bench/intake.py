"""DICOM intake throughput: radtriage's C-STORE SCP against a real PACS (Orthanc), same box,
same sender, same series.

    python -m bench.intake                       # 240 x 512 x 512 CT, 3 alternating runs, 1/2/4 senders
    python -m bench.intake --slices 60 --runs 1 --concurrency 1 --json
    python -m bench.intake --scp-repo /work/main # the SCP from another checkout (before/after)
    python -m bench.intake --profile prof.out    # cProfile of the SCP process (pstats file)

What runs: a local Kafka (the project's LocalKafka, as the tests start it); the radtriage
SCP (`start_scp`) in its own process, on a fresh topic, with its blob store in a temp
dir — so success still means "fsynced in the blob store and acked by Kafka (acks=all)";
Orthanc (Debian's `Orthanc`, its own JSON config: own ports on 127.0.0.1, storage in a
temp dir, default storage, no auth, no plugins). The sender is dcmtk's storescu with
TCP_NODELAY=1 (dcmtk's own setting; without it each C-STORE waits for a delayed ACK).

Measured: instances/s of one storescu association sending the whole series, radtriage and
Orthanc alternating `--runs` times (Orthanc's copy of the study is deleted before each of
its runs, so it stores every instance each time: a PACS ignores an instance it already
has); then N storescu processes at once, each sending a slice of the series over its
own association. Also the SCP process's peak resident memory (VmHWM).
Writes JSON to bench/results/intake.json (or stdout with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.output import print_or_write
from bench.proc_status import status_kb
from models.dicom_writer import write_ct_series
from radtriage.kafka_admin import ensure_topics
from radtriage.settings import REPO_ROOT
from tests.support.kafka import local_kafka
from tests.support.net import free_port
from tests.support.orthanc import Orthanc

RESULTS = REPO_ROOT / "bench" / "results" / "intake.json"

# The SCP process: only start_scp and Settings, so any checkout's SCP can be measured.
# Both children (plain and profiled) begin with the SCP's settings from the JSON config in
# argv[1] ...
_CHILD_SETTINGS = r"""
import json, signal, sys, threading
from pathlib import Path
cfg = json.loads(sys.argv[1])
from radtriage.settings import Settings
from connectors.dicom import scp as scp_module
try:  # the listener has its own module since the SCP's split; older checkouts had it in scp
    from connectors.dicom.listener import start_scp
except ImportError:
    start_scp = scp_module.start_scp
settings = Settings(home=Path(cfg["home"]))
settings.kafka.bootstrap_servers = cfg["bootstrap"]
settings.dicom.port = cfg["port"]
settings.dicom.bind_address = "127.0.0.1"
settings.topics.instances = cfg["topic"]
settings.telemetry.exporter = "none"
"""
# ... and serve until the bench sends SIGTERM, saying "ready" once the SCP listens.
_CHILD_SERVE = r"""
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
_servers, stop = start_scp(settings)
print("ready", flush=True)
done.wait()
stop()
"""

SCP_CHILD = (
    _CHILD_SETTINGS
    + r"""
if cfg.get("max_pdu"):
    settings.dicom.max_pdu = cfg["max_pdu"]
if cfg.get("dul_delay"):
    # Experiment: pynetdicom's DUL reactor sleeps _run_loop_delay (1 ms) whenever it finds
    # nothing to do; set per association as it opens.
    from pynetdicom import evt
    handlers = scp_module.StoreSCP.handlers
    def with_delay(self):
        def conn_open(event):
            event.assoc.dul._run_loop_delay = cfg["dul_delay"]
        return [*handlers(self), (evt.EVT_CONN_OPEN, conn_open)]
    scp_module.StoreSCP.handlers = with_delay
"""
    + _CHILD_SERVE
)

# A cProfile run must see the association threads: pynetdicom starts one per association,
# and cProfile.Profile only profiles the thread it was enabled in. So the profiled child
# wraps the per-association handler instead.
SCP_CHILD_PROFILED = (
    _CHILD_SETTINGS
    + r"""
import cProfile, pstats
profiles = []
original = scp_module.StoreSCP.handle_store
def handle_store(self, event):
    p = cProfile.Profile()
    p.enable()
    try:
        return original(self, event)
    finally:
        p.disable()
        profiles.append(p)
scp_module.StoreSCP.handle_store = handle_store
"""
    + _CHILD_SERVE
    + r"""
stats = pstats.Stats(profiles[0])
for p in profiles[1:]:
    stats.add(p)
stats.dump_stats(cfg["profile"])
"""
)


def dcmtk(name: str) -> str:
    # dcmtk's, not the venv's pynetdicom app of the same name.
    venv_bin = str(Path(sys.prefix) / "bin")
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and d != venv_bin]
    path = shutil.which(name, path=os.pathsep.join(dirs))
    if path is None:
        raise SystemExit(f"{name} not found: scripts/install.sh --test installs it")
    return path


def write_series(out: Path, slices: int, size: int) -> list[Path]:
    """A head-CT-like series: skull ring, brain, air and padding, scanner-like noise."""
    rng = np.random.default_rng(6)
    y, x = np.mgrid[:size, :size]
    r = np.hypot(y - size / 2, x - size / 2) / (size / 2)
    plane = np.where(r < 0.8, 35.0, np.where(r < 0.88, 1200.0, -1000.0))
    plane[r > 1.0] = -2000.0  # padding outside the reconstruction circle
    volume = plane[None, :, :] + rng.normal(0, 8, (slices, size, size))
    return write_ct_series(volume, (1.0, 0.45, 0.45), out, accession="BENCH", patient_id="BENCH")


@contextmanager
def radtriage_scp(
    bootstrap: str,
    work: Path,
    repo: Path,
    profile: Path | None,
    dul_delay: float = 0.0,
    max_pdu: int = 0,
) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    port = free_port()
    topic = f"imaging.instances.bench-{os.getpid()}-{port}"
    ensure_topics(bootstrap, {topic: 3})
    cfg = {
        "home": str(work / "radtriage-home"),
        "bootstrap": bootstrap,
        "port": port,
        "topic": topic,
        "profile": str(profile) if profile else "",
        "dul_delay": dul_delay,
        "max_pdu": max_pdu,
    }
    env = {**os.environ, "PYTHONPATH": str(repo)}
    code = SCP_CHILD_PROFILED if profile else SCP_CHILD
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(cfg)], cwd=repo, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("radtriage SCP did not start")
        yield port, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def send(port: int, aet: str, files: list[Path], senders: int) -> float:
    """Seconds for `senders` storescu processes to send `files` between them (one association each)."""
    chunks = [files[i::senders] for i in range(senders)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [dcmtk("storescu"), "-aec", aet, "127.0.0.1", str(port), *map(str, chunk)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for chunk in chunks
    ]
    outputs = [p.communicate()[0] for p in procs]
    elapsed = time.perf_counter() - started
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed ({p.returncode}): {out.decode(errors='replace')[-2000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=240)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3, help="alternating single-association runs per target")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--scp-repo", type=Path, default=REPO_ROOT, help="checkout whose SCP is measured")
    ap.add_argument("--profile", type=Path, default=None, help="cProfile the SCP's C-STORE handler")
    ap.add_argument(
        "--max-pdu",
        type=int,
        default=0,
        help="maximum PDU both SCPs announce (bytes; default: each one's own, 16 KB for both)",
    )
    ap.add_argument(
        "--dul-delay",
        type=float,
        default=0.0,
        help="experiment: pynetdicom DUL idle sleep (s) per association",
    )
    ap.add_argument("--json", action="store_true", help="print the JSON instead of writing it")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="radtriage-bench-intake-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        files = write_series(work / "series", args.slices, args.size)
        series_mb = sum(f.stat().st_size for f in files) / 1e6
        kafka = stack.enter_context(local_kafka(work / "kafka"))
        orthanc = Orthanc(work, args.max_pdu)
        orthanc.start()
        stack.callback(orthanc.stop)
        rt_port, rt_proc = stack.enter_context(
            radtriage_scp(
                kafka.bootstrap_servers,
                work,
                args.scp_repo.resolve(),
                args.profile,
                args.dul_delay,
                args.max_pdu,
            )
        )
        # Warm-up (not counted): the producer's first connection and metadata, Orthanc's
        # first database writes, the page cache for the files.
        send(rt_port, "RADTRIAGE", files[:5], 1)
        send(orthanc.dicom_port, "ORTHANC", files[:5], 1)

        runs: list[dict[str, Any]] = []
        for run in range(args.runs):
            orthanc.clear()
            rt = send(rt_port, "RADTRIAGE", files, 1)
            orthanc.clear()
            ot = send(orthanc.dicom_port, "ORTHANC", files, 1)
            assert orthanc.instance_count() == len(files)
            runs.append(
                {
                    "run": run + 1,
                    "radtriage_per_s": round(len(files) / rt, 1),
                    "orthanc_per_s": round(len(files) / ot, 1),
                    "ratio": round(ot / rt, 3),
                }
            )
            print(json.dumps(runs[-1]), file=sys.stderr)
        peak_mb = status_kb("VmHWM", rt_proc.pid) / 1024

        scaling: list[dict[str, Any]] = []
        for senders in args.concurrency:
            orthanc.clear()
            rt = send(rt_port, "RADTRIAGE", files, senders)
            orthanc.clear()
            ot = send(orthanc.dicom_port, "ORTHANC", files, senders)
            scaling.append(
                {
                    "senders": senders,
                    "radtriage_per_s": round(len(files) / rt, 1),
                    "orthanc_per_s": round(len(files) / ot, 1),
                    "ratio": round(ot / rt, 3),
                }
            )
            print(json.dumps(scaling[-1]), file=sys.stderr)
        peak_all_mb = status_kb("VmHWM", rt_proc.pid) / 1024

    result = {
        "bench": "intake",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "scp_repo": str(args.scp_repo.resolve()),
        "series": {
            "instances": len(files),
            "rows": args.size,
            "columns": args.size,
            "mb": round(series_mb, 1),
        },
        "sender": "dcmtk storescu, TCP_NODELAY=1",
        "dul_delay_s": args.dul_delay or None,
        "max_pdu": args.max_pdu or "defaults (radtriage 16382, Orthanc 16384)",
        "single_association": runs,
        "median_ratio": statistics.median(r["ratio"] for r in runs),
        "median_radtriage_per_s": statistics.median(r["radtriage_per_s"] for r in runs),
        "median_orthanc_per_s": statistics.median(r["orthanc_per_s"] for r in runs),
        "concurrent": scaling,
        "scp_peak_rss_mb_single_association": round(peak_mb, 1),
        "scp_peak_rss_mb_all_runs": round(peak_all_mb, 1),
    }
    print_or_write(result, args.out, print_only=args.json, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
