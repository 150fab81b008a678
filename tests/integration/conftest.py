from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from radtriage.settings import Settings
from tests.integration.harness import make_worker_env


@pytest.fixture
def worker_env(kafka_bootstrap: str, tmp_path: Path) -> Iterator[tuple[dict[str, str], Settings]]:
    """Env and settings for a `radtriage worker` on fresh per-test topics and app id."""
    yield from make_worker_env(kafka_bootstrap, tmp_path)
