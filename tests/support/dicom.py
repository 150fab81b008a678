"""dcmtk's command-line tools, and the DICOM listener on a topic of the test's own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectors.dicom.listener import start_scp
from radtriage.settings import Settings
from tests.support.kafka import PARTITIONS
from tests.support.net import free_port
from tests.support.settings import isolated_settings


def dcmtk_tool(name: str) -> str:
    """A dcmtk program (storescu, echoscu) from PATH, skipping the venv's bin: pynetdicom
    installs apps of the same names there, first on PATH when the venv is activated."""
    venv_bin = str(Path(sys.prefix) / "bin")
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and d != venv_bin]
    path = shutil.which(name, path=os.pathsep.join(dirs))
    assert path, f"dcmtk's {name} is required (scripts/install.sh --test installs it: apt-get install dcmtk)"
    return path


def storescu(
    *args: str, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu with `args`, its output captured."""
    # errors="replace": dcmtk echoes bytes of a corrupt file in its messages.
    return subprocess.run(
        [dcmtk_tool("storescu"), *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        env=env,
    )


def storescu_send(
    port: int,
    files: Sequence[Path],
    *,
    calling: str,
    called: str = "RADTRIAGE",
    verbose: bool = False,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`files` sent by storescu as AE `calling` to `called` on the loopback `port`."""
    return storescu(
        *(["-v"] if verbose else []),
        "-aec", called, "-aet", calling, "127.0.0.1", str(port), *map(str, files),
        timeout=timeout,
        env=env,
    )  # fmt: skip


@dataclass
class Listener:
    """A running DICOM listener: its settings, and the function that stops it."""

    settings: Settings
    stop: Any

    @property
    def port(self) -> int:
        return self.settings.dicom.port

    @property
    def topic(self) -> str:
        return self.settings.topics.instances


def dicom_settings(home: Path, bootstrap: str, partitions: int | None = PARTITIONS) -> Settings:
    """Settings of a listener on a free loopback port whose `imaging.instances` topic is the
    test's own: nothing else writes there (created here unless `partitions` is None)."""
    settings = isolated_settings(home, bootstrap, ("instances",), partitions=partitions)
    settings.dicom.port = free_port()
    settings.dicom.bind_address = "127.0.0.1"
    return settings


@contextmanager
def running_scp(settings: Settings) -> Iterator[Listener]:
    """`start_scp` (in this process) for the `with` block."""
    _server, stop = start_scp(settings)
    try:
        yield Listener(settings, stop)
    finally:
        stop()


def send_files(listener: Listener, files: Sequence[Path]) -> subprocess.CompletedProcess[str]:
    """storescu -v (it reports each C-STORE's status) sending `files` to `listener`."""
    return storescu(
        "-v", "-aec", listener.settings.dicom.ae_title, "127.0.0.1", str(listener.port), *map(str, files)
    )
