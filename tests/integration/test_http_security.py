"""TLS and authentication on the HTTP port, against the real server and a real Kafka.

Real clients (requests, ssl) with certificates the test makes (openssl CLI); every
protected route is tried with no, wrong and malformed credentials, and the token is
looked for in everything the server writes: its log and its traces.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from radtriage.demo_messages import post_fhir
from radtriage.demo_messages import service_request as demo_service_request
from radtriage.kafka_admin import ensure_topics
from radtriage.settings import REPO_ROOT, Settings
from tests.certs import Pki, make_pki
from tests.integration.test_fhir_intake import (
    FHIR_JSON,
    _settings,
    outcome,
    post,
    service_request,
)
from tests.integration.test_stow_rs import STOW_TYPE, multipart, part10, series
from tests.support.http import healthy, http_env, start_intake, stop_intake
from tests.support.kafka import PARTITIONS, read_topic
from tests.support.net import free_port
from tests.support.process import start_radtriage, wait_ready
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

TOKEN = "rt-" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
ROTATED = "rt-" + uuid.uuid4().hex
TIMEOUT = (5, 60)
STOW_BODY = multipart([b"\0" * 1024])

# Every protected route: method, path, body, content type.
PROTECTED = [
    ("POST", "/fhir/ServiceRequest", json.dumps(service_request("NOAUTH")).encode(), "application/fhir+json"),
    ("POST", "/fhir", b"{}", "application/fhir+json"),
    ("GET", "/fhir/metadata", None, None),
    ("POST", "/dicomweb/studies", STOW_BODY, STOW_TYPE),
    ("GET", "/metrics", None, None),
    ("GET", "/", None, None),
    ("GET", "/operator/events", None, None),
    ("GET", "/operator/api/state", None, None),
    ("POST", "/operator/api/ack", b'{"alert_id": "x", "by": "me"}', "application/json"),
    ("GET", "/no/such/path", None, None),
]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("certs"))


def secured(tmp_path: Path, bootstrap: str, certs: Pki | None, mode: str, **tls: Path) -> Settings:
    settings = _settings(tmp_path / "home", bootstrap)
    settings.http.auth.mode = mode  # type: ignore[assignment]
    if mode in ("bearer", "bearer_or_mtls"):
        tokens = tmp_path / "tokens"
        tokens.write_text(f"# test tokens\n{TOKEN}  # the test client\n")
        settings.http.auth.tokens_file = tokens
    if certs is not None:
        settings.http.tls.enabled = True
        settings.http.tls.cert_file, settings.http.tls.key_file = certs.server_cert, certs.server_key
        settings.http.tls.client_ca_file = tls.get("client_ca_file")
    ensure_topics(bootstrap, {settings.topics.orders: PARTITIONS, settings.topics.instances: PARTITIONS})
    return settings


class Server:
    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.intake = start_intake(settings, loop)
        self.settings = settings
        self.port = self.intake.handle.port

    @property
    def base(self) -> str:
        return f"{self.settings.http.scheme}://127.0.0.1:{self.port}"


@pytest.fixture
def serve(loop: asyncio.AbstractEventLoop) -> Iterator[object]:
    servers: list[Server] = []

    def start(settings: Settings) -> Server:
        servers.append(Server(settings, loop))
        return servers[-1]

    yield start
    for s in servers:
        stop_intake(s.intake)


def call(
    session: requests.Session,
    base: str,
    method: str,
    path: str,
    body: bytes | None,
    ctype: str | None,
    **kw: object,
) -> requests.Response:
    headers = dict(kw.pop("headers", None) or {})  # type: ignore[call-overload]
    if ctype:
        headers["Content-Type"] = ctype
    return session.request(method, base + path, data=body, headers=headers, timeout=TIMEOUT, **kw)  # type: ignore[arg-type]


def assert_refused(r: requests.Response, error: bool) -> None:
    assert r.status_code == 401, (r.status_code, r.text[:300])
    challenge = r.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="radtriage"'), challenge
    assert ('error="invalid_token"' in challenge) == error
    issue = outcome(r).issue[0]
    assert issue.code == "login" and issue.severity == "error"


def refusals(base: str, session: requests.Session) -> dict[str, float]:
    """radtriage_http_auth_refusals_total by reason, as /metrics tells an authenticated scraper."""
    r = session.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=TIMEOUT)
    assert r.status_code == 200
    out = {}
    for line in r.text.splitlines():
        if line.startswith("radtriage_http_auth_refusals_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


# -- bearer over plain HTTP -----------------------------------------------------------------


def test_every_protected_route_refuses_missing_wrong_and_malformed_credentials(
    kafka_bootstrap: str, tmp_path: Path, serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = serve(secured(tmp_path, kafka_bootstrap, None, "bearer"))
    s = requests.Session()
    before = refusals(server.base, s)
    wrong = {"Authorization": "Bearer " + "w" * 40}
    basic_wrong = {"Authorization": "Basic " + base64.b64encode(b"nurse:" + b"w" * 40).decode()}
    malformed = [{"Authorization": TOKEN}, {"Authorization": f"Token {TOKEN}"}, {"Authorization": "Bearer"}]
    for method, path, body, ctype in PROTECTED:
        assert_refused(call(s, server.base, method, path, body, ctype), error=False)
        assert_refused(call(s, server.base, method, path, body, ctype, headers=wrong), error=True)
        assert_refused(call(s, server.base, method, path, body, ctype, headers=basic_wrong), error=True)
        for headers in malformed:
            assert_refused(call(s, server.base, method, path, body, ctype, headers=headers), error=True)
    # The operator page also offers Basic, so that a browser asks for the token.
    r = s.get(f"{server.base}/", timeout=TIMEOUT)
    assert any(v.startswith("Basic ") for v in r.raw.headers.getlist("WWW-Authenticate"))
    # Public: the health probe.
    assert s.get(f"{server.base}/healthz", timeout=TIMEOUT).status_code == 200

    n = len(PROTECTED)
    after = refusals(server.base, s)
    gained = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert gained == {
        "missing_credentials": n + 1,
        "invalid_token": 2 * n,
        "malformed_authorization": 3 * n,
    } | {k: 0 for k in ("client_cert_required", "other") if k in gained}
    # Nothing was published for a refused request.
    assert read_topic(kafka_bootstrap, server.settings.topics.orders, 1, timeout_s=3, settle_s=0) == []
    refused = [r for r in caplog.records if r.name == "connectors.http.auth"]
    assert refused and all("127.0.0.1" in r.getMessage() for r in refused)
    assert "refused POST /fhir/{type} from 127.0.0.1: invalid_token" in caplog.text
    assert TOKEN not in caplog.text and "w" * 40 not in caplog.text


def test_a_valid_token_gets_normal_service(
    kafka_bootstrap: str, tmp_path: Path, serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = serve(secured(tmp_path, kafka_bootstrap, None, "bearer"))
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {TOKEN}"
    r = post(s, f"{server.base}/fhir/ServiceRequest", service_request("AUTH-1"))
    assert r.status_code == 201, r.text
    (record,) = read_topic(kafka_bootstrap, server.settings.topics.orders, 1)
    assert record.key.decode() == "AUTH-1"
    assert s.get(f"{server.base}/metrics", timeout=TIMEOUT).text.startswith("# HELP")
    page = s.get(f"{server.base}/", timeout=TIMEOUT)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert s.get(f"{server.base}/operator/api/state", timeout=TIMEOUT).json()["version"] >= 0
    # The browser's way in: Basic with the token as the password, any user name.
    browser = requests.get(f"{server.base}/operator/api/state", auth=("nurse", TOKEN), timeout=TIMEOUT)
    assert browser.status_code == 200
    assert TOKEN not in caplog.text


def test_rotating_the_tokens_file_takes_effect_without_a_restart(
    kafka_bootstrap: str, tmp_path: Path, serve
) -> None:
    settings = secured(tmp_path, kafka_bootstrap, None, "bearer")
    server = serve(settings)
    url = f"{server.base}/fhir/metadata"

    def status(token: str) -> int:
        return requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT).status_code

    assert (status(TOKEN), status(ROTATED)) == (200, 401)
    path = settings.http.auth.tokens_file
    assert path is not None
    path.write_text(f"{ROTATED}\n")
    os.utime(path, ns=(time.time_ns() + 5 * 10**9,) * 2)
    wait_until(lambda: status(ROTATED) == 200, "the rotated token accepted", 10, interval=0.3)
    assert status(TOKEN) == 401
    # A broken edit keeps the last good tokens: no outage, no crash.
    path.write_text("not a token at all\n")
    os.utime(path, ns=(time.time_ns() + 10 * 10**9,) * 2)
    time.sleep(1.5)
    assert (status(ROTATED), status(TOKEN)) == (200, 401)


# -- TLS ------------------------------------------------------------------------------------


def test_https_with_the_test_ca_and_plain_http_is_refused(
    kafka_bootstrap: str, tmp_path: Path, serve, certs: Pki
) -> None:
    server = serve(secured(tmp_path, kafka_bootstrap, certs, "bearer"))
    s = requests.Session()
    s.trust_env = False  # else REQUESTS_CA_BUNDLE overrides s.verify (requests#3829)
    s.verify = str(certs.ca)
    s.headers["Authorization"] = f"Bearer {TOKEN}"
    r = post(s, f"{server.base}/fhir/ServiceRequest", service_request("TLS-1"))
    assert r.status_code == 201, r.text
    # Location headers follow the scheme the client used.
    assert r.headers["Location"].startswith(f"https://127.0.0.1:{server.port}/fhir/ServiceRequest/")
    datasets = series(tmp_path / "series", 7, slices=1)
    stow = s.post(
        f"{server.base}/dicomweb/studies",
        data=multipart([part10(ds) for ds in datasets]),
        headers={"Content-Type": STOW_TYPE, "Accept": "application/dicom+json"},
        timeout=TIMEOUT,
    )
    assert stow.status_code == 200, stow.text
    assert stow.json()["00081190"]["Value"][0].startswith(
        f"https://127.0.0.1:{server.port}/dicomweb/studies/"
    )
    # The operator page's assets and its event stream over https.
    page = s.get(f"{server.base}/", timeout=TIMEOUT)
    assert page.status_code == 200 and 'src="/operator/static/operator.js' in page.text
    with s.get(f"{server.base}/operator/events", stream=True, timeout=TIMEOUT) as events:
        assert events.status_code == 200
        assert next(events.iter_lines()).startswith(b"retry:")
    # Still 401 without a token over TLS.
    assert_refused(requests.get(f"{server.base}/metrics", verify=str(certs.ca), timeout=TIMEOUT), error=False)
    # A client that does not trust the CA refuses the server; plain HTTP gets nothing.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{server.base}/healthz", timeout=TIMEOUT)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=TIMEOUT)
    # ...and the server is none the worse for it.
    assert s.get(f"{server.base}/healthz", timeout=TIMEOUT).status_code == 200
    # `radtriage demo` reaches it from the same settings: the server's certificate, a token.
    demo = server.settings.model_copy(deep=True)
    demo.http.port = server.port
    location = post_fhir(demo, demo_service_request("DEMO-1", "MRN-1", priority="stat"))
    assert location.startswith(f"https://127.0.0.1:{server.port}/fhir/ServiceRequest/")
    records = read_topic(kafka_bootstrap, server.settings.topics.orders, 2)
    assert sorted(r.key.decode() for r in records) == ["DEMO-1", "TLS-1"]


def test_tls_below_1_2_is_refused(kafka_bootstrap: str, tmp_path: Path, serve, certs: Pki) -> None:
    server = serve(secured(tmp_path, kafka_bootstrap, certs, "off"))
    # A client that offers only TLS 1.0/1.1 (it would connect to a server that allowed them).
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                pass
    # With auth off and TLS on, the port serves as before, only encrypted.
    assert requests.get(f"{server.base}/metrics", verify=str(certs.ca), timeout=TIMEOUT).status_code == 200


# -- mTLS -----------------------------------------------------------------------------------


def test_mtls_requires_a_certificate_from_the_client_ca(
    kafka_bootstrap: str, tmp_path: Path, serve, certs: Pki
) -> None:
    server = serve(secured(tmp_path, kafka_bootstrap, certs, "mtls", client_ca_file=certs.ca))
    url = f"{server.base}/fhir/ServiceRequest"
    body = json.dumps(service_request("MTLS-1"))
    with pytest.raises(requests.ConnectionError):
        requests.post(url, data=body, headers=FHIR_JSON, verify=str(certs.ca), timeout=TIMEOUT)
    with pytest.raises(requests.ConnectionError):
        requests.post(
            url, data=body, headers=FHIR_JSON, verify=str(certs.ca), timeout=TIMEOUT,
            cert=(str(certs.other_client_cert), str(certs.other_client_key)),
        )  # fmt: skip
    good = requests.post(
        url, data=body, headers=FHIR_JSON, verify=str(certs.ca), timeout=TIMEOUT,
        cert=(str(certs.client_cert), str(certs.client_key)),
    )  # fmt: skip
    assert good.status_code == 201, good.text
    records = read_topic(kafka_bootstrap, server.settings.topics.orders, 1)
    assert [r.key.decode() for r in records] == ["MTLS-1"]


def test_bearer_or_mtls_takes_either(kafka_bootstrap: str, tmp_path: Path, serve, certs: Pki) -> None:
    server = serve(secured(tmp_path, kafka_bootstrap, certs, "bearer_or_mtls", client_ca_file=certs.ca))
    url = f"{server.base}/metrics"
    ca = str(certs.ca)
    assert_refused(requests.get(url, verify=ca, timeout=TIMEOUT), error=False)
    client = (str(certs.client_cert), str(certs.client_key))
    assert requests.get(url, verify=ca, cert=client, timeout=TIMEOUT).status_code == 200
    token = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(url, verify=ca, headers=token, timeout=TIMEOUT).status_code == 200
    # A certificate from another CA fails the handshake even though one is optional.
    with pytest.raises(requests.ConnectionError):
        requests.get(
            url, verify=ca, cert=(str(certs.other_client_cert), str(certs.other_client_key)), timeout=TIMEOUT
        )


# -- the `radtriage http` process ----------------------------------------------------------


def _process_env(tmp_path: Path, kafka_bootstrap: str, port: int, **extra: str) -> dict[str, str]:
    return http_env(tmp_path / "home", kafka_bootstrap, port, RADTRIAGE_OPERATOR__ENABLED="false", **extra)


def test_the_token_never_reaches_the_process_log_or_its_traces(
    kafka_bootstrap: str, tmp_path: Path, certs: Pki
) -> None:
    port = free_port()
    settings = secured(tmp_path, kafka_bootstrap, certs, "bearer")
    env = _process_env(
        tmp_path,
        kafka_bootstrap,
        port,
        RADTRIAGE_TOPICS__ORDERS=settings.topics.orders,
        RADTRIAGE_TELEMETRY__EXPORTER="jsonl",
        RADTRIAGE_HTTP__TLS__ENABLED="true",
        RADTRIAGE_HTTP__TLS__CERT_FILE=str(certs.server_cert),
        RADTRIAGE_HTTP__TLS__KEY_FILE=str(certs.server_key),
        RADTRIAGE_HTTP__AUTH__MODE="bearer",
        # One token from the environment, one from the file.
        RADTRIAGE_HTTP__AUTH__TOKENS=json.dumps([ROTATED]),
        RADTRIAGE_HTTP__AUTH__TOKENS_FILE=str(settings.http.auth.tokens_file),
    )
    log_path = tmp_path / "http.log"
    proc = start_radtriage(["http"], env, log_path, new_session=False)
    try:
        base = f"https://127.0.0.1:{port}"
        s = requests.Session()
        s.trust_env = False  # else REQUESTS_CA_BUNDLE overrides s.verify (requests#3829)
        s.verify = str(certs.ca)
        wait_ready(proc, lambda: healthy(base, s), log_path, "radtriage http never became healthy")
        for token in (TOKEN, ROTATED):
            r = post(s, f"{base}/fhir/ServiceRequest", service_request(f"P-{token[:6]}"),
                     {**FHIR_JSON, "Authorization": f"Bearer {token}"})  # fmt: skip
            assert r.status_code == 201, r.text
        for bad in (f"Bearer {TOKEN}x", f"Bearer {ROTATED[:-1]}", TOKEN, f"Basic {TOKEN}"):
            r = post(
                s,
                f"{base}/fhir/ServiceRequest",
                service_request("X"),
                {**FHIR_JSON, "Authorization": bad},
            )
            assert r.status_code == 401
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log_path.read_text()
    assert "HTTP intake listening on https://127.0.0.1" in text and "auth bearer" in text
    assert "refused POST /fhir/{type} from 127.0.0.1: invalid_token" in text
    assert "refused POST /fhir/{type} from 127.0.0.1: malformed_authorization" in text
    traces = (tmp_path / "home" / "traces.jsonl").read_text()
    assert "POST /fhir/{type}" in traces
    for secret in (TOKEN, ROTATED, TOKEN[6:30], base64.b64encode(TOKEN.encode()).decode()[:20]):
        assert secret not in text and secret not in traces


def test_a_bad_tokens_file_stops_the_process_at_start_up_with_the_reason(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n{TOKEN[:8]}\n")
    env = _process_env(
        tmp_path,
        kafka_bootstrap,
        free_port(),
        RADTRIAGE_HTTP__AUTH__MODE="bearer",
        RADTRIAGE_HTTP__AUTH__TOKENS_FILE=str(tokens),
    )
    done = subprocess.run(
        [sys.executable, "-m", "radtriage.cli", "http"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=60,
    )
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 2, out
    assert f"HTTP intake not started: tokens file {tokens}, line 2: token shorter than 16 characters" in out
    assert "Traceback" not in out and TOKEN[:8] not in out
