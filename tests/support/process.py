"""`radtriage <command>` as a child process of a test, and waiting for it to be ready."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

from radtriage.settings import REPO_ROOT
from radtriage.stack.process import port_in_use, terminate_with_parent


def start_radtriage(
    args: Sequence[str], env: dict[str, str], log: Path, *, new_session: bool = True
) -> subprocess.Popen[bytes]:
    """`python -m radtriage.cli <args>` from the repo root with `env`, its output appended to
    `log`; in a session of its own (unless `new_session` is false) so that a test can signal
    it and everything it started with os.killpg."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "radtriage.cli", *args],
            env=env,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
            # An interrupted test run leaves no worker or listener reconnecting to dead peers.
            preexec_fn=terminate_with_parent(),
        )


def run_replay(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real `radtriage replay <args>` as an operator runs it, with `env`'s settings; its
    output captured (wide: its table is not wrapped)."""
    return subprocess.run(
        [sys.executable, "-m", "radtriage.cli", "replay", *args],
        env={**env, "COLUMNS": "250"},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def wait_ready(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], object],
    log: Path,
    what: str,
    timeout: float = 60,
    interval: float = 0.2,
) -> None:
    """Return once `ready()` is true; fail with the end of `log` if `proc` exits first, or
    saying `what` it never did after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"{what} (after {timeout:.0f} s)"
        time.sleep(interval)


def wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 60) -> None:
    """`wait_ready` until something accepts connections on the loopback `port`."""
    wait_ready(proc, lambda: port_in_use(port), log, f"{proc.args!r} never opened port {port}", timeout)


def stop_process(proc: subprocess.Popen[Any] | None, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace_s`: a test peer's stop
    (HAPI's JVM needs the SIGTERM to close its H2 file; nginx and Orthanc exit on it)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class PeerProcess:
    """A test peer that runs as a process of its own (`start` launches it into `proc`):
    `with peer:` starts it and stops it whatever the test does; `stop` is SIGTERM, then
    SIGKILL after `stop_grace_s`."""

    proc: subprocess.Popen[Any] | None = None
    stop_grace_s = 10.0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, self.stop_grace_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
