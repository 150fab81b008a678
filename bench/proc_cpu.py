"""CPU seconds used by each process of the stack this benchmark started, read from /proc.

Evidence for the "is it CPU contention?" question: the stack's processes (Kafka's JVM,
Triton and its Python-backend stub, the Faust worker, the listeners) are descendants of
the benchmark, so their user+system time per phase shows who burned the 2 cores while
stat studies waited. Linux only; elsewhere it reports nothing rather than failing.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.proc_status import cmdline

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds user+system) of one live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime = int(fields[11]), int(fields[12])
    return ppid, (utime + stime) / _CLK_TCK


def _label(pid: int) -> str:
    words = cmdline(pid)
    if not words:
        return "?"
    exe = os.path.basename(words[0])
    if "radtriage.cli" in words:
        i = words.index("radtriage.cli")
        return words[i + 1] if i + 1 < len(words) else "radtriage"
    if exe == "java" or any("kafka" in w.lower() for w in words[1:3]):
        return "kafka"
    if "triton_python_backend_stub" in exe:
        return "triton python backend (model)"
    if "tritonserver" in exe:
        return "tritonserver"
    return exe


def descendants_cpu(root: int | None = None) -> dict[str, float]:
    """CPU seconds so far per component label, over every descendant of `root` (default: us)."""
    root = os.getpid() if root is None else root
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    try:
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    except OSError:
        return {}
    for pid in pids:
        st = _stat(pid)
        if st is not None:
            parents[pid], cpu[pid] = st
    out: dict[str, float] = {}
    for pid in cpu:
        p = pid
        while p in parents and p not in (0, 1, root):
            p = parents[p]
        if p == root and pid != root:
            label = _label(pid)
            out[label] = out.get(label, 0.0) + cpu[pid]
    return out


def self_cpu() -> float:
    """This process's own CPU seconds (the load generator's share of the machine)."""
    t = os.times()
    return t.user + t.system


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """CPU seconds per component between two readings (processes that died in between count 0)."""
    return {k: round(v - before.get(k, 0.0), 2) for k, v in sorted(after.items())}
