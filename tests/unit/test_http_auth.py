"""The HTTP port's authentication decision, the tokens file, and the TLS settings checks."""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from connectors.http import tokens as tokens_mod
from connectors.http.auth import challenges, decide, is_public, presented_token, token_store, unauthorized
from connectors.http.tls import TlsConfigError, client_context, server_context
from connectors.http.tokens import TokenError, TokenStore, digest, parse_tokens_file, read_tokens_file
from radtriage import metrics
from radtriage.settings import SETTINGS_JSON_ENV, HttpAuthSettings, HttpSettings, Settings, load_settings
from radtriage.up import child_env
from tests.certs import make_pki

GOOD = "tok-" + "a" * 28
OTHER = "tok-" + "b" * 28
ACCEPTED = (digest(GOOD), digest(OTHER))
PUBLIC = ["/healthz", "/operator/static/"]
CERT = {"subject": ((("commonName", "client"),),)}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- decide ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "path", "authorization", "cert", "allowed", "reason"),
    [
        ("off", "/fhir/ServiceRequest", None, None, True, "auth_off"),
        ("bearer", "/healthz", None, None, True, "public_path"),
        ("bearer", "/operator/static/operator.js", None, None, True, "public_path"),
        ("bearer", "/fhir/ServiceRequest", f"Bearer {GOOD}", None, True, "token"),
        ("bearer", "/fhir/ServiceRequest", f"bearer   {OTHER}", None, True, "token"),
        ("bearer", "/", basic("anyone", GOOD), None, True, "token"),
        ("bearer", "/metrics", None, None, False, "missing_credentials"),
        ("bearer", "/metrics", "   ", None, False, "missing_credentials"),
        ("bearer", "/metrics", f"Bearer {GOOD}x", None, False, "invalid_token"),
        ("bearer", "/metrics", f"Bearer {GOOD[:-1]}", None, False, "invalid_token"),
        ("bearer", "/metrics", basic("anyone", "wrong-token-wrong-token"), None, False, "invalid_token"),
        ("bearer", "/metrics", "Bearer", None, False, "malformed_authorization"),
        ("bearer", "/metrics", GOOD, None, False, "malformed_authorization"),
        ("bearer", "/metrics", f"Token {GOOD}", None, False, "malformed_authorization"),
        ("bearer", "/metrics", f"Bearer {GOOD} extra", None, False, "malformed_authorization"),
        ("bearer", "/metrics", "Bearer tok%en", None, False, "malformed_authorization"),
        ("bearer", "/metrics", "Basic !!!notbase64", None, False, "malformed_authorization"),
        (
            "bearer",
            "/metrics",
            "Basic " + base64.b64encode(b"nocolon").decode(),
            None,
            False,
            "malformed_authorization",
        ),
        (
            "bearer",
            "/metrics",
            "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),
            None,
            False,
            "malformed_authorization",
        ),
        # A certificate is no credential in bearer mode (client_ca_file there only adds a requirement).
        ("bearer", "/metrics", None, CERT, False, "missing_credentials"),
        ("mtls", "/dicomweb/studies", None, CERT, True, "client_cert"),
        ("mtls", "/dicomweb/studies", f"Bearer {GOOD}", None, False, "client_cert_required"),
        ("mtls", "/dicomweb/studies", None, {}, False, "client_cert_required"),
        ("mtls", "/healthz", None, None, True, "public_path"),
        ("bearer_or_mtls", "/fhir", None, CERT, True, "client_cert"),
        ("bearer_or_mtls", "/fhir", f"Bearer {GOOD}", None, True, "token"),
        ("bearer_or_mtls", "/fhir", None, None, False, "missing_credentials"),
        ("bearer_or_mtls", "/fhir", f"Bearer {'c' * 32}", None, False, "invalid_token"),
    ],
)
def test_decide(
    mode: str, path: str, authorization: str | None, cert: dict | None, allowed: bool, reason: str
) -> None:
    d = decide(mode, path, authorization, cert, ACCEPTED, PUBLIC)  # type: ignore[arg-type]
    assert (d.allowed, d.reason) == (allowed, reason)


def test_public_paths_are_exact_unless_they_end_with_a_slash() -> None:
    assert is_public("/healthz", PUBLIC)
    assert not is_public("/healthz/x", PUBLIC) and not is_public("/healthzx", PUBLIC)
    assert is_public("/operator/static/a.css", PUBLIC) and not is_public("/operator/static", PUBLIC)
    assert not is_public("/healthz", [])


def test_no_token_is_accepted_when_none_are_configured() -> None:
    assert decide("bearer", "/fhir", f"Bearer {GOOD}", None, (), PUBLIC).reason == "invalid_token"


def test_presented_token() -> None:
    assert presented_token(f"Bearer {GOOD}") == GOOD
    assert presented_token(basic("", GOOD)) == GOOD
    assert presented_token(basic("u", "")) is None
    assert presented_token("Digest x") is None


def test_refusal_is_a_401_operation_outcome_with_a_bearer_challenge() -> None:
    r = unauthorized("bearer", "invalid_token", "/fhir/ServiceRequest", has_body=True)
    assert r.status == 401 and r.content_type == "application/fhir+json"
    assert r.headers.getall("WWW-Authenticate") == ['Bearer realm="radtriage", error="invalid_token"']
    assert r.headers["Connection"] == "close"
    assert isinstance(r.body, bytes)
    body = json.loads(r.body)
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "login"
    missing = unauthorized("bearer", "missing_credentials", "/metrics", has_body=False)
    assert missing.headers.getall("WWW-Authenticate") == ['Bearer realm="radtriage"']
    assert "Connection" not in missing.headers


def test_the_operator_page_also_offers_basic_so_a_browser_can_log_in() -> None:
    for path in ("/", "/operator/events", "/operator/api/state"):
        assert challenges("bearer", "missing_credentials", path) == [
            'Bearer realm="radtriage"',
            'Basic realm="radtriage operator page", charset="UTF-8"',
        ]
    assert len(challenges("bearer", "missing_credentials", "/fhir")) == 1
    assert challenges("mtls", "client_cert_required", "/") == ['Bearer realm="radtriage"']


def test_refusal_reasons_are_the_counter_labels() -> None:
    from connectors.http.auth import REFUSAL_REASONS

    assert set(REFUSAL_REASONS) == metrics.HTTP_AUTH_REFUSAL_REASONS
    before = metrics.HTTP_AUTH_REFUSALS.labels("other")._value.get()
    metrics.count_http_auth_refusal("made-up")
    assert metrics.HTTP_AUTH_REFUSALS.labels("other")._value.get() == before + 1


# -- tokens file -------------------------------------------------------------------------


def test_tokens_file_lines_comments_and_blanks() -> None:
    text = f"# rotated 2025-01-01\n\n  {GOOD}  \n{OTHER} # the PACS gateway\n\t# old one removed\n"
    assert parse_tokens_file(text) == [GOOD, OTHER]
    assert parse_tokens_file("") == []


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("sh0rtT0k\n", "line 1: token shorter than 16"),
        (f"{GOOD}\n{GOOD} {OTHER}\n", "line 2: more than one word"),
        (f'{GOOD}\nbad"quote{"x" * 20}\n', "line 2: token has characters"),
        (f"# c\n{'é' * 20}\n", "line 2: token has characters"),
    ],
)
def test_bad_tokens_file_says_which_line_and_never_quotes_it(text: str, says: str) -> None:
    with pytest.raises(TokenError) as exc:
        parse_tokens_file(text, "tokens file t")
    assert says in str(exc.value)
    for word in text.split():
        if len(word) > 3 and not word.startswith("#"):
            assert word not in str(exc.value)


def test_unreadable_tokens_files(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="cannot read it"):
        read_tokens_file(tmp_path / "missing")
    with pytest.raises(TokenError, match="cannot read it"):
        read_tokens_file(tmp_path)  # a directory
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TokenError, match="not UTF-8"):
        read_tokens_file(binary)
    huge = tmp_path / "huge"
    huge.write_bytes(b"#" * (tokens_mod.MAX_FILE_BYTES + 1))
    with pytest.raises(TokenError, match="not a tokens file"):
        read_tokens_file(huge)


def test_token_store_start_up_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(TokenError, match="needs at least one token"):
        token_store(HttpAuthSettings(mode="bearer", tokens_file=empty))
    with pytest.raises(TokenError, match="cannot read it"):
        token_store(HttpAuthSettings(mode="bearer", tokens_file=tmp_path / "nope"))
    with pytest.raises(TokenError, match=r"http.auth.tokens\[1\]: token shorter"):
        token_store(HttpAuthSettings(mode="bearer", tokens=[SecretStr(GOOD), SecretStr("x")]))
    # Off and mtls need no tokens.
    assert token_store(HttpAuthSettings(mode="off")).digests() == ()
    assert token_store(HttpAuthSettings(mode="bearer", tokens=[SecretStr(GOOD)])).digests() == (digest(GOOD),)


def test_tokens_file_rotation_and_a_bad_edit_keeps_the_last_good_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tokens_mod, "RECHECK_S", 0.0)
    path = tmp_path / "tokens"
    path.write_text(GOOD + "\n")
    store = TokenStore([SecretStr(OTHER)], path)
    assert store.load() == 2
    assert set(store.current()) == {digest(GOOD), digest(OTHER)}

    new = "tok-" + "n" * 28
    _rewrite(path, f"{new}\n")
    assert set(store.current()) == {digest(new), digest(OTHER)}

    caplog.set_level(logging.INFO, "connectors.http.tokens")
    _rewrite(path, f"{new}\ntoo-short\n")
    assert set(store.current()) == {digest(new), digest(OTHER)}
    store.current()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "line 2" in errors[0].getMessage()
    path.unlink()
    assert set(store.current()) == {digest(new), digest(OTHER)}
    _rewrite(path, f"{GOOD}\n")
    assert set(store.current()) == {digest(GOOD), digest(OTHER)}
    assert all(t not in caplog.text for t in (GOOD, OTHER, new, "too-short"))


def _rewrite(path: Path, text: str) -> None:
    path.write_text(text)
    # A distinct mtime even on coarse-timestamp filesystems.
    stamp = time.time_ns() + 10**9 * (1 + int(path.stat().st_mtime))
    os.utime(path, ns=(stamp, stamp))


def test_settings_mask_tokens_except_for_up_children(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    s.http.auth.tokens = [SecretStr(GOOD)]
    assert GOOD not in s.model_dump_json() and GOOD not in repr(s)
    # What `radtriage up` hands a child, and what the child reads back.
    monkeypatch.setenv(SETTINGS_JSON_ENV, child_env(s)[SETTINGS_JSON_ENV])
    assert load_settings().http.auth.tokens[0].get_secret_value() == GOOD


def test_tokens_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADTRIAGE_HTTP__AUTH__MODE", "bearer")
    monkeypatch.setenv("RADTRIAGE_HTTP__AUTH__TOKENS", json.dumps([GOOD, OTHER]))
    auth = Settings().http.auth
    assert auth.mode == "bearer" and [t.get_secret_value() for t in auth.tokens] == [GOOD, OTHER]


# -- TLS settings ------------------------------------------------------------------------


def test_defaults_are_plain_http_and_no_auth() -> None:
    http = HttpSettings()
    assert http.auth.mode == "off" and not http.tls.enabled and http.scheme == "http"
    assert server_context(http) is None


def test_tls_context(tmp_path: Path) -> None:
    certs = make_pki(tmp_path)
    http = HttpSettings()
    http.tls.enabled = True
    http.tls.cert_file, http.tls.key_file = certs.server_cert, certs.server_key
    ctx = server_context(http)
    assert ctx is not None and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    http.tls.client_ca_file = certs.ca
    assert server_context(http).verify_mode == ssl.CERT_REQUIRED  # type: ignore[union-attr]
    http.auth.mode = "bearer_or_mtls"
    assert server_context(http).verify_mode == ssl.CERT_OPTIONAL  # type: ignore[union-attr]
    assert client_context(http).verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"cert_file": None}, "http.tls.cert_file is not set"),
        ({"key_file": "missing"}, "http.tls.key_file .*missing: no such file"),
        ({"key_file": "client_key"}, "http.tls: cannot use certificate .* with key .*client.key"),
        ({"cert_file": "garbage"}, "http.tls: cannot use certificate .*garbage"),
        ({"client_ca_file": "garbage"}, "http.tls.client_ca_file .*garbage: not a PEM CA certificate"),
        ({"enabled": False, "client_ca_file": "client_ca"}, "need http.tls.enabled"),
        ({"mode": "mtls"}, "mtls needs http.tls.client_ca_file"),
    ],
)
def test_bad_tls_settings_fail_at_start_up(tmp_path: Path, change: dict, says: str) -> None:
    certs = make_pki(tmp_path)
    (tmp_path / "garbage").write_text("not a certificate\n")
    files = {
        "client_key": certs.client_key,
        "client_ca": certs.ca,
        "garbage": tmp_path / "garbage",
        "missing": tmp_path / "missing",
    }
    http = HttpSettings()
    http.tls.enabled = True
    http.tls.cert_file, http.tls.key_file = certs.server_cert, certs.server_key
    for key, value in change.items():
        if key == "mode":
            http.auth.mode = value
        else:
            setattr(http.tls, key, files.get(value, value) if isinstance(value, str) else value)
    with pytest.raises(TlsConfigError, match=says):
        server_context(http)
