"""A service process in its own session: started, waited for, stopped with nothing left behind."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Self


class ServiceError(RuntimeError):
    """A local service did not start or stopped unexpectedly; the message carries its log tail."""


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# prctl(2) option: the signal a child gets when the thread that started it dies.
_PR_SET_PDEATHSIG = 1


def terminate_with_parent() -> Callable[[], None] | None:
    """A Popen `preexec_fn` that has the child SIGTERMed when the process starting it dies,
    even by SIGKILL (Linux's PR_SET_PDEATHSIG), so a killed `radtriage up` or test run leaves
    no Kafka, Triton or worker behind holding its ports. The signal follows the *thread* that
    started the child: every caller starts its services from its main thread. None where
    prctl is not there (the child then outlives a killed parent, as before)."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name or os.uname().sysname != "Linux":
        return None
    parent = os.getpid()

    def in_child() -> None:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child


class LocalService(ABC):
    """A service this process starts and stops (Kafka, a Kafka cluster, Triton): `with`
    starts it and stops it however the block ends."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServiceProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_file: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name, self.argv, self.log_file = name, list(argv), log_file
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            # Own session: a Ctrl-C in the terminal reaches `radtriage up`, which then stops
            # each service in order, instead of every process dying at once.
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=terminate_with_parent(),
            )

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServiceError(
                    f"{self.name} exited (code {code}) before {what}; last lines of {self.log_file}:\n"
                    f"{log_tail(self.log_file)}"
                )
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.25)
        self.stop()
        raise ServiceError(
            f"{self.name}: timed out after {timeout:.0f}s waiting for {what}; "
            f"last lines of {self.log_file}:\n{log_tail(self.log_file)}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # Anything the service forked into its session goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.process = None
