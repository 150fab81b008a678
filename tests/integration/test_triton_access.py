"""Triton with a key (triton.api_key): every API but health refuses a request without it.

Health (server live/ready and model ready) stays open for probes; it tells nothing but
up/down.

A real tritonserver started by our launcher with `--grpc-restricted-protocol` /
`--http-restricted-api`; radtriage's own client (the lanes' TritonModelClient) sends the
key and gets answers, a stock tritonclient / HTTP client without it is refused.
"""

from __future__ import annotations

import asyncio
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from tritonclient.grpc import InferenceServerClient
from tritonclient.utils import InferenceServerException

from processors.preprocessing import ICH_INPUT_SHAPE
from processors.triton_client import TritonModelClient
from radtriage.settings import REPO_ROOT, TritonSettings
from radtriage.stack.triton import LocalTriton
from tests.support.net import free_port

pytestmark = pytest.mark.integration

KEY = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def keyed_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalTriton, TritonSettings]]:
    keyfile = tmp_path_factory.mktemp("triton-key") / "key"
    keyfile.write_text(KEY + "\n")
    settings = TritonSettings(api_key_file=keyfile)
    server = LocalTriton(
        REPO_ROOT / "deploy" / "triton" / "model_repository",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_file=tmp_path_factory.mktemp("triton-log") / "triton.log",
        extra_pythonpath=[REPO_ROOT],
        restricted=settings.auth_headers(),
    )
    server.start()
    try:
        yield server, settings
    finally:
        server.stop()


def test_without_the_key_grpc_is_refused_but_health_answers(
    keyed_triton: tuple[LocalTriton, TritonSettings],
) -> None:
    server, _ = keyed_triton
    client = InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        # Probes need no key (Triton counts model readiness as health too).
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("ich_classifier")
        for call in (
            lambda: client.get_model_repository_index(),
            lambda: client.get_model_metadata("ich_classifier"),
        ):
            with pytest.raises(InferenceServerException, match=r"(?i)restricted|permission|unauthenticated"):
                call()
        # A wrong key is no key.
        with pytest.raises(InferenceServerException):
            client.get_model_metadata(
                "ich_classifier", headers={"triton-grpc-protocol-radtriage-triton-key": "wrong"}
            )
    finally:
        client.close()


def test_without_the_key_http_is_refused_but_health_answers(
    keyed_triton: tuple[LocalTriton, TritonSettings],
) -> None:
    server, settings = keyed_triton
    base = f"http://127.0.0.1:{server.http_port}"
    with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=10) as ok:
        assert ok.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base}/v2/models/ich_classifier", timeout=10)
    assert refused.value.code in (401, 403)
    keyed = urllib.request.Request(f"{base}/v2/models/ich_classifier", headers=settings.auth_headers())
    with urllib.request.urlopen(keyed, timeout=10) as meta:
        assert meta.status == 200


def test_radtriage_client_with_the_key_infers(keyed_triton: tuple[LocalTriton, TritonSettings]) -> None:
    server, settings = keyed_triton

    async def run() -> float:
        client = TritonModelClient(f"127.0.0.1:{server.grpc_port}", 20.0, settings.grpc_auth_headers())
        try:
            assert await client.is_ready("ich_classifier")
            volume = np.zeros(ICH_INPUT_SHAPE, np.float32)
            result = await client.infer_probability("ich_classifier", volume, 1)
            return result.probability
        finally:
            await client.close()

    assert 0.0 <= asyncio.run(run()) <= 1.0


def test_the_key_is_not_in_the_settings_dump_but_reaches_children() -> None:
    settings = TritonSettings(api_key=KEY)
    assert KEY not in settings.model_dump_json()
    assert KEY in settings.model_dump_json(context={"reveal_secrets": True})
