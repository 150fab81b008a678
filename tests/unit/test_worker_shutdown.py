"""A worker whose stop overruns its deadline exits hard instead of outliving its pod."""

from __future__ import annotations

import subprocess
import sys

from radtriage.settings import REPO_ROOT
from radtriage.worker import EXIT_SHUTDOWN_OVERRUN


def test_a_stop_that_overruns_the_deadline_exits_hard_with_its_own_status() -> None:
    # A non-daemon thread that never ends stands for a stop stuck in a pool or rebalance:
    # without the deadline the interpreter would wait for it forever.
    script = (
        "import threading, time\n"
        "from radtriage.worker import arm_shutdown_deadline\n"
        "threading.Thread(target=time.sleep, args=(600,)).start()\n"
        "arm_shutdown_deadline(0.5)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == EXIT_SHUTDOWN_OVERRUN
    assert "exiting without a clean stop" in done.stderr
