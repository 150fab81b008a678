from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.harness import Stack, start_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A whole `radtriage up` per test module (the walking skeleton's last test stops its own)."""
    yield from start_stack(tmp_path_factory)
