"""ehr.fhir's client certificate (mutual TLS to the EHR's FHIR server): the settings, and the
SSL context `server_for` builds from them at registration — a certificate that cannot be
used stops the worker's start with an error naming the file, never a send."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from radtriage.settings import EhrFhirSettings
from streams.stages.ehr_fhir import ClientCertificateError, server_for
from tests.certs import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _settings(**fields: object) -> EhrFhirSettings:
    return EhrFhirSettings.model_validate({"base_url": "https://ehr.example.org/fhir", **fields})


def test_a_key_needs_its_certificate_and_a_certificate_needs_https(pki: Pki) -> None:
    with pytest.raises(ValidationError, match="client_key_file needs client_cert_file"):
        _settings(client_key_file=str(pki.client_key))
    with pytest.raises(ValidationError, match="only over https"):
        EhrFhirSettings(base_url="http://h/fhir", client_cert_file=pki.client_cert)


def test_the_client_certificate_is_in_the_context_with_the_servers_ca(pki: Pki) -> None:
    server = server_for(
        _settings(
            ca_file=str(pki.ca), client_cert_file=str(pki.client_cert), client_key_file=str(pki.client_key)
        )
    )
    assert isinstance(server.ssl, ssl.SSLContext)
    assert server.ssl.verify_mode == ssl.CERT_REQUIRED and server.ssl.check_hostname
    # The server's CA is the one configured.
    assert ((("commonName", "ca"),),) in [c["subject"] for c in server.ssl.get_ca_certs()]


def test_unchecked_server_still_gets_the_client_certificate(pki: Pki) -> None:
    server = server_for(
        _settings(
            tls_verify=False, client_cert_file=str(pki.client_cert), client_key_file=str(pki.client_key)
        )
    )
    assert isinstance(server.ssl, ssl.SSLContext)
    assert server.ssl.verify_mode == ssl.CERT_NONE and not server.ssl.check_hostname
    # Without a certificate to show, unchecked stays aiohttp's plain "no verification".
    assert server_for(_settings(tls_verify=False)).ssl is False


@pytest.mark.parametrize(
    ("cert", "key", "why"),
    [
        ("missing.pem", "client.key", "No such file"),
        ("client.pem", "other-client.key", "KEY_VALUES_MISMATCH"),
        ("server.pem", "server-enc.key", "encrypted key is not supported"),
        ("client.key", None, "PEM lib|NO_CERTIFICATE|no start line"),
    ],
)
def test_an_unusable_certificate_fails_registration_naming_it(
    pki: Pki, cert: str, key: str | None, why: str
) -> None:
    d = pki.ca.parent
    config = _settings(client_cert_file=str(d / cert), client_key_file=None if key is None else str(d / key))
    with pytest.raises(ClientCertificateError, match=why) as caught:
        server_for(config)
    assert f"ehr.fhir client certificate {Path(d / cert)}" in str(caught.value)
