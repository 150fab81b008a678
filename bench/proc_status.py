"""What /proc says about a process: a status field (memory), its command line, who its
children are. Linux only, as the benches that read it (they measure a local stack).

Readers never fail on a process that is gone: a bench reads processes that may exit
between listing and reading, and a missing figure is better than a lost run.
"""

from __future__ import annotations

from pathlib import Path


def status_kb(key: str, pid: int | str = "self") -> int:
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM…); 0 when the process or field is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def cmdline(pid: int) -> list[str]:
    """The process's argv; empty when it is gone (or a kernel thread)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def children() -> dict[int, list[int]]:
    """Every live process's children, by parent pid."""
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return out
