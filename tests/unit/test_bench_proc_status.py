"""bench/proc_status.py: the /proc readers the benches measure memory and find workers with."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.proc_cpu import _label
from bench.proc_status import children, cmdline, status_kb


def _gone_pid() -> int:
    """A pid that was ours and has exited (reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_status_kb_reads_this_process_and_another_by_pid() -> None:
    # RSS first: the high-water mark read after it covers it, however the process grew
    # between the two reads (read the other way round, it failed once by 4 kB).
    rss = status_kb("VmRSS")
    assert status_kb("VmHWM") >= rss > 0
    assert status_kb("VmRSS", os.getpid()) > 0


def test_status_kb_is_0_for_a_field_or_process_that_is_not_there() -> None:
    assert status_kb("NoSuchField") == 0
    assert status_kb("VmRSS", _gone_pid()) == 0


def test_children_and_cmdline_find_a_child_by_its_argv() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", "marker"], stdin=subprocess.PIPE
    )
    try:
        assert child.pid in children()[os.getpid()]
        assert cmdline(child.pid)[-1] == "marker"
        assert _label(child.pid) == os.path.basename(sys.executable)
    finally:
        child.communicate(b"")
    assert cmdline(_gone_pid()) == []
