"""A service started by radtriage (Kafka, Triton, a worker under `radtriage up` or a test run)
goes when the process that started it is SIGKILLed (radtriage/stack/process.py,
terminate_with_parent): no orphan keeps its port or reconnects to a dead broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STARTER = """
import sys, time
from pathlib import Path
from radtriage.stack.process import ServiceProcess
service = ServiceProcess("sleeper", ["sleep", "120"], Path(sys.argv[1]))
service.start()
print(service.process.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    # A child of a dead parent may stay a zombie until init reaps it: it is gone all the same.
    return "State:\tZ" not in state


def test_a_service_goes_with_the_sigkilled_process_that_started_it(tmp_path: Path) -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path / "sleeper.log")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert starter.stdout is not None
    child = int(starter.stdout.readline())
    assert _alive(child)
    os.kill(starter.pid, signal.SIGKILL)
    starter.wait(10)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not _alive(child), "the service outlived the process that started it"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
