"""Mutual TLS to the EHR's FHIR server (ehr.fhir client_cert_file / client_key_file), against
real peers: the HAPI FHIR JPA server (tests/support/fhir_server.py) behind nginx, which
terminates TLS and wants a client certificate signed by its CA (tests/support/tls_proxy.py,
`ssl_verify_client on`), through a real worker and Kafka.

Without a client certificate, or with one from another CA, nginx answers HTTP 400 ("No
required SSL certificate was sent" / "The SSL certificate error") after the handshake:
the report is refused, dead-lettered with that cause and not retried (the same request
would be refused again: it is the configuration to fix). Once the worker has its
certificate, a new report is stored and the refused one is stored by
`radtriage replay --stage ehr-fhir`."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from kafka import KafkaProducer

from processors.fhir_report import build_result_bundle
from processors.fhir_transaction import build_transaction, encode
from radtriage.settings import EhrFhirSettings, Settings
from schemas.results import FhirResult
from streams.fhir_sender import Rejected, deliver, post_transaction
from streams.retry import Retry
from streams.stages.ehr_fhir import server_for
from tests.certs import Pki, make_pki
from tests.integration.harness import Worker
from tests.support.fhir_server import HapiFhirServer
from tests.support.findings import ich_result
from tests.support.kafka import Tail
from tests.support.process import run_replay
from tests.support.tls_proxy import MutualTlsProxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def ehr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HapiFhirServer]:
    with HapiFhirServer(tmp_path_factory.mktemp("hapi-fhir")) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, ehr: HapiFhirServer
) -> Iterator[MutualTlsProxy]:
    work = tmp_path_factory.mktemp("nginx")
    with MutualTlsProxy(work, f"http://127.0.0.1:{ehr.port}", pki.server_cert, pki.server_key, pki.ca) as p:
        yield p


def _fhir(
    proxy: MutualTlsProxy, pki: Pki, cert: Path | None = None, key: Path | None = None
) -> EhrFhirSettings:
    fields: dict[str, object] = {
        "base_url": proxy.url("/fhir"),
        "ca_file": str(pki.ca),
        "timeout_s": 20,
        "retry_deadline_s": 60,
        "retry_initial_s": 0.5,
        "retry_max_s": 3,
    }
    if cert is not None:
        fields |= {"client_cert_file": str(cert), "client_key_file": str(key)}
    return EhrFhirSettings.model_validate(fields)


def _env(env: dict[str, str], fhir: EhrFhirSettings) -> dict[str, str]:
    return {**env, "RADTRIAGE_EHR__FHIR": fhir.model_dump_json(exclude_none=True)}


def _result(stamp: int, suffix: str) -> FhirResult:
    study = f"1.2.826.0.41.{stamp}.{suffix}"
    finding = ich_result(study, study + ".2", accession_number=f"MT{stamp}{suffix}")
    return FhirResult(
        study_uid=study, accession_number=finding.accession_number, finding="ICH",
        bundle=build_result_bundle(finding), request_id=finding.request_id,
    )  # fmt: skip


def _decisions(tail: Tail, settings: Settings, study: str) -> list[str]:
    return [a["decision"] for a in tail.of(settings.topics.audit, study_uid=study) if a["stage"] == "ehr"]


def _stored_on(ehr: HapiFhirServer, result: FhirResult) -> int:
    _, key = build_transaction(result.bundle)
    return len(ehr.search("DiagnosticReport", identifier=key.token))


def test_a_certificate_from_another_ca_is_refused_by_the_server(
    proxy: MutualTlsProxy, pki: Pki, ehr: HapiFhirServer
) -> None:
    result = _result(time.time_ns(), "other")
    transaction, _ = build_transaction(result.bundle)
    server = server_for(_fhir(proxy, pki, pki.other_client_cert, pki.other_client_key))

    async def run() -> object:
        async with aiohttp.ClientSession() as session:
            return await deliver(
                lambda: post_transaction(session, server, encode(transaction)), Retry(10, 0.5, 1)
            )

    outcome = asyncio.run(run())
    assert isinstance(outcome, Rejected), outcome
    assert outcome.status == 400 and "The SSL certificate error" in outcome.reason
    assert outcome.attempts == 1  # not retried: the same certificate would be refused again
    assert _stored_on(ehr, result) == 0
    assert "client SSL certificate verify error" in proxy.error_log


def test_without_its_certificate_a_report_is_dead_lettered_and_with_it_stored_and_replayed(
    worker_env: tuple[dict[str, str], Settings], proxy: MutualTlsProxy, pki: Pki, ehr: HapiFhirServer
) -> None:
    env, settings = worker_env
    t = settings.topics
    stamp = time.time_ns()
    refused, stored = _result(stamp, "1"), _result(stamp, "2")
    tail = Tail(settings.kafka.bootstrap_servers, [t.audit, t.deadletter])
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")

    # 1. The server's CA only, no client certificate: nginx refuses the request.
    without = Worker(_env(env, _fhir(proxy, pki)), settings.home)
    without.start()
    producer.send(t.results_fhir, key=refused.study_uid.encode(), value=refused.to_bytes()).get(10)
    tail.until(lambda: _decisions(tail, settings, refused.study_uid), timeout=120)
    without.kill(signal.SIGTERM)
    assert _decisions(tail, settings, refused.study_uid) == ["fhir_refused"]
    (letter,) = tail.of(t.deadletter, study_uid=refused.study_uid)
    assert letter["stage"] == "ehr-fhir" and letter["source_topic"] == t.results_fhir
    assert "HTTP 400" in letter["error"] and "No required SSL certificate was sent" in letter["error"]
    assert _stored_on(ehr, refused) == 0

    # 2. Its certificate configured: a new report is stored through the proxy...
    with_cert = _env(env, _fhir(proxy, pki, pki.client_cert, pki.client_key))
    worker = Worker(with_cert, settings.home)
    worker.start()
    producer.send(t.results_fhir, key=stored.study_uid.encode(), value=stored.to_bytes()).get(10)
    tail.until(lambda: _decisions(tail, settings, stored.study_uid), timeout=120)
    assert _decisions(tail, settings, stored.study_uid) == ["fhir_stored"]
    assert _stored_on(ehr, stored) == 1

    # 3. ...and the refused one, replayed by the operator, too: once.
    replay = run_replay(with_cert, "--stage", "ehr-fhir")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    tail.until(lambda: len(_decisions(tail, settings, refused.study_uid)) == 2, timeout=60)
    assert _decisions(tail, settings, refused.study_uid) == ["fhir_refused", "fhir_stored"]
    assert _stored_on(ehr, refused) == 1
    worker.kill(signal.SIGTERM)
