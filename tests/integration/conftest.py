from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from radtriage.settings import Settings
from tests.integration.harness import make_worker_env
from tests.support.dicom import Listener, dicom_settings, running_scp


@pytest.fixture
def worker_env(kafka_bootstrap: str, tmp_path: Path) -> Iterator[tuple[dict[str, str], Settings]]:
    """Env and settings for a `radtriage worker` on fresh per-test topics and app id."""
    yield from make_worker_env(kafka_bootstrap, tmp_path)


@pytest.fixture
def listener(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Listener]:
    """The DICOM listener (in this process) on a free port, publishing to an `imaging.instances`
    topic of the test's own."""
    with running_scp(dicom_settings(tmp_path / "home", kafka_bootstrap)) as scp:
        yield scp
