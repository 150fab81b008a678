"""Session fixtures that start the REAL services once per test run.

Kafka and Triton are started by the project's own launchers (the same ones
`radtriage up` uses) on the default ports unless RADTRIAGE_TEST_KAFKA /
RADTRIAGE_TEST_TRITON point at running instances.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from radtriage.settings import REPO_ROOT
from tests.support.loop import LoopThread
from tests.support.net import free_port


@pytest.fixture(scope="session")
def service_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def kafka_bootstrap(service_dir: Path) -> Iterator[str]:
    """A real single-node Apache Kafka (KRaft) for the whole session."""
    external = os.environ.get("RADTRIAGE_TEST_KAFKA")
    if external:
        yield external
        return
    from tests.support.kafka import local_kafka

    with local_kafka(service_dir / "kafka") as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def triton_grpc_url(service_dir: Path) -> Iterator[str]:
    """A real Triton Inference Server serving the repo's model repository."""
    external = os.environ.get("RADTRIAGE_TEST_TRITON")
    if external:
        yield external
        return
    from radtriage.stack.triton import LocalTriton

    grpc_port = free_port()
    server = LocalTriton(
        REPO_ROOT / "deploy" / "triton" / "model_repository",
        http_port=free_port(),
        grpc_port=grpc_port,
        metrics_port=free_port(),
        log_file=service_dir / "triton.log",
        extra_pythonpath=[REPO_ROOT],
    )
    server.start()
    try:
        yield f"127.0.0.1:{grpc_port}"
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def tracing() -> None:
    """A real tracer provider (no exporter): spans get ids and traceparent is propagated,
    as in every radtriage process."""
    from radtriage.settings import Settings
    from radtriage.tracing_sdk import setup_tracing

    settings = Settings()
    settings.telemetry.exporter = "none"
    setup_tracing(settings, "tests")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own for the test (see tests/support/loop.py)."""
    with LoopThread() as thread:
        yield thread.loop
