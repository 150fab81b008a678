"""POSTing a FHIR transaction (streams/fhir_sender.py) to a real HTTP server of our own
(aiohttp, on loopback, scripted answers): 2xx stored with the server's locations, a 4xx
refused with the OperationOutcome's text and not retried, 5xx/429/silence/a closed port
retried to the deadline, a server that comes up late gets the transaction once; the
settings, credentials and TLS choice of the stage (streams/stages/ehr_fhir.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from radtriage.settings import EhrFhirSettings, Settings
from streams.fhir_sender import Rejected, Server, Stored, deliver, post_transaction
from streams.retry import Retry, Undelivered
from streams.stages.ehr_fhir import auth_headers, server_for
from tests.support.net import free_port

QUICK = Retry(deadline_s=1.5, initial_s=0.05, max_s=0.2)
PAYLOAD = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []}).encode()
Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _response(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=json.dumps(body), content_type="application/fhir+json")


STORED = {
    "resourceType": "Bundle",
    "type": "transaction-response",
    "entry": [{"response": {"status": "201 Created", "location": "DiagnosticReport/5/_history/1"}}],
}
OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "processing", "diagnostics": "Unknown status 'bogus'"}],
}


class FhirPeer:
    """An HTTP server answering POST /fhir with the scripted answers, in order (the last one
    for ever), recording each request's headers and body."""

    def __init__(self, *answers: Answer, port: int | None = None) -> None:
        self.answers, self.port = list(answers), port or free_port()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((dict(request.headers), await request.read()))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return await answer(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/fhir", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    def server(self, timeout_s: float = 2.0) -> Server:
        return Server(f"http://127.0.0.1:{self.port}/fhir/", {"Authorization": "Bearer t0k"}, None, timeout_s)


def answer(status: int, body: dict[str, Any] | None = None, delay_s: float = 0.0) -> Answer:
    async def reply(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(delay_s)
        return _response(status, STORED if status == 200 else body or OUTCOME)

    return reply


async def _send(peer: FhirPeer, timeout_s: float = 2.0, start: bool = True) -> object:
    if start:
        await peer.start()
    try:
        async with aiohttp.ClientSession() as session:
            return await deliver(lambda: post_transaction(session, peer.server(timeout_s), PAYLOAD), QUICK)
    finally:
        await peer.stop()


def test_a_2xx_is_stored_with_the_server_s_locations_and_our_credentials() -> None:
    peer = FhirPeer(answer(200))
    outcome = asyncio.run(_send(peer))
    assert outcome == Stored(200, ("DiagnosticReport/5/_history/1",), 1)
    ((headers, body),) = peer.requests
    assert body == PAYLOAD
    assert headers["Authorization"] == "Bearer t0k" and headers["Content-Type"] == "application/fhir+json"


@pytest.mark.parametrize("status", [400, 404, 412, 422])
def test_a_4xx_is_refused_with_the_outcome_s_text_and_not_sent_again(status: int) -> None:
    peer = FhirPeer(answer(status))
    outcome = asyncio.run(_send(peer))
    assert isinstance(outcome, Rejected) and outcome.attempts == 1 and outcome.status == status
    assert outcome.reason == f"HTTP {status}: error processing: Unknown status 'bogus'"
    assert len(peer.requests) == 1


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_5xx_or_429_is_retried_and_stored_when_the_server_recovers(status: int) -> None:
    peer = FhirPeer(answer(status), answer(status), answer(200))
    outcome = asyncio.run(_send(peer))
    assert isinstance(outcome, Stored) and outcome.attempts == 3
    assert len(peer.requests) == 3 and {body for _, body in peer.requests} == {PAYLOAD}


def test_a_server_failing_to_the_deadline_is_undelivered_with_its_last_answer() -> None:
    peer = FhirPeer(answer(503))
    outcome = asyncio.run(_send(peer))
    assert isinstance(outcome, Undelivered) and outcome.attempts >= 2
    assert "HTTP 503" in outcome.reason and "Unknown status 'bogus'" in outcome.reason
    assert "attempt(s) in 1.5 s" in outcome.reason


def test_silence_is_a_timeout_retried_to_the_deadline() -> None:
    peer = FhirPeer(answer(200, delay_s=5.0))
    outcome = asyncio.run(_send(peer, timeout_s=0.2))
    assert isinstance(outcome, Undelivered) and "within 0.2 s" in outcome.reason
    assert len(peer.requests) == outcome.attempts >= 2


def test_a_closed_port_is_retried_and_a_server_that_comes_up_gets_it_once() -> None:
    peer = FhirPeer(answer(200))

    async def late() -> object:
        async def up() -> None:
            await asyncio.sleep(0.3)
            await peer.start()

        starting = asyncio.ensure_future(up())
        outcome = await _send(peer, start=False)
        await starting
        return outcome

    outcome = asyncio.run(late())
    assert isinstance(outcome, Stored) and outcome.attempts >= 2
    assert len(peer.requests) == 1


def test_a_closed_port_to_the_deadline_is_undelivered_naming_the_server() -> None:
    port = free_port()
    server = Server(f"http://127.0.0.1:{port}/fhir", {}, None, 1.0)

    async def run() -> object:
        async with aiohttp.ClientSession() as session:
            return await deliver(lambda: post_transaction(session, server, PAYLOAD), QUICK)

    outcome = asyncio.run(run())
    assert isinstance(outcome, Undelivered)
    assert f"cannot reach http://127.0.0.1:{port}/fhir" in outcome.reason


def test_credentials_and_tls_from_the_settings(tmp_path: Any) -> None:
    bearer = EhrFhirSettings.model_validate({"base_url": "http://h/fhir", "auth": {"bearer_token": "abc"}})
    assert auth_headers(bearer) == {"Authorization": "Bearer abc"}
    basic = EhrFhirSettings.model_validate(
        {"base_url": "https://h/fhir", "auth": {"username": "u", "password": "p"}}
    )
    assert auth_headers(basic) == {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
    assert auth_headers(EhrFhirSettings(base_url="http://h")) == {}
    assert server_for(bearer).ssl is None
    assert isinstance(server_for(basic).ssl, ssl.SSLContext)
    unchecked = EhrFhirSettings(base_url="https://h", tls_verify=False)
    assert server_for(unchecked).ssl is False
    with pytest.raises(FileNotFoundError):
        server_for(EhrFhirSettings(base_url="https://h", ca_file=tmp_path / "missing.pem"))


def test_the_fhir_server_is_read_from_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RADTRIAGE_EHR__FHIR", raising=False)
    assert Settings().ehr.fhir is None
    monkeypatch.setenv(
        "RADTRIAGE_EHR__FHIR",
        '{"base_url": "https://ehr.example/fhir", "auth": {"bearer_token": "s3cret"},'
        ' "retry_deadline_s": 60}',
    )
    fhir = Settings().ehr.fhir
    assert fhir is not None
    assert (fhir.base_url, fhir.retry_deadline_s, fhir.timeout_s) == ("https://ehr.example/fhir", 60.0, 30.0)
    assert fhir.auth.bearer_token is not None and "s3cret" not in repr(fhir)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({}, "base_url"),
        ({"base_url": "ftp://h"}, "base_url"),
        ({"base_url": "http://h", "timeout_s": 0}, "timeout_s"),
        (
            {"base_url": "http://h", "auth": {"bearer_token": "t", "username": "u", "password": "p"}},
            "not both",
        ),
        ({"base_url": "http://h", "auth": {"username": "u"}}, "together"),
    ],
)
def test_a_bad_fhir_server_setting_says_which(value: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        EhrFhirSettings.model_validate(value)
