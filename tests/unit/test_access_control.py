"""Pure decisions of issue 7's DICOM/MLLP access control: allow-list entries, the caller
check, the settings that carry them (env, YAML, errors at start) and the TLS context."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from connectors.allowlist import address_in, peer_ip, source_allowed
from connectors.dicom.callers import (
    CALLED_AE_NOT_RECOGNISED,
    CALLING_AE_NOT_RECOGNISED,
    REASONS,
    check_association,
)
from radtriage.settings import DicomSettings, Settings, TlsSettings, parse_network
from radtriage.tls import TlsConfigError, server_context
from tests.certs import SERVER_KEY_PASSWORD, Pki, make_pki


def _dicom(**kw: object) -> DicomSettings:
    return DicomSettings.model_validate(kw)


# -- allow-list entries ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("10.1.2.0/24", "10.1.2.0/24"),
        ("10.1.2.7", "10.1.2.7/32"),
        (" 192.168.0.0/16 ", "192.168.0.0/16"),
        ("::1", "::1/128"),
        ("fd00::/8", "fd00::/8"),
        ("0.0.0.0/0", "0.0.0.0/0"),
    ],
)
def test_network_entries_parse(text: str, network: str) -> None:
    assert parse_network(text) == ipaddress.ip_network(network)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.1.2.5/24", "has host bits set: did you mean 10.1.2.0/24?"),
        ("10.1.2.0/33", "is not an IP address or CIDR block"),
        ("ct-scanner.example", "is not an IP address or CIDR block"),
        ("", "is not an IP address or CIDR block"),
        ("10.1.2", "is not an IP address or CIDR block"),
    ],
)
def test_bad_network_entries_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_network(text)


@pytest.mark.parametrize(
    ("address", "ip"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),  # an IPv4 peer on a dual-stack (::) socket
        ("fe80::1%eth0", "fe80::1"),
        ("::1", "::1"),
    ],
)
def test_peer_ip(address: str, ip: str) -> None:
    assert peer_ip(address) == ipaddress.ip_address(ip)


@pytest.mark.parametrize("address", ["", "?", "not-an-ip", "10.1.2.3:104", "/tmp/socket"])
def test_unreadable_peer_is_in_no_list(address: str) -> None:
    assert peer_ip(address) is None
    assert not address_in(address, [parse_network("0.0.0.0/0"), parse_network("::/0")])
    assert not source_allowed(address, [parse_network("0.0.0.0/0")])


def test_source_allowed() -> None:
    allowed = [parse_network("10.1.2.0/24"), parse_network("127.0.0.1"), parse_network("fd00::/8")]
    assert source_allowed("10.1.2.200", allowed)
    assert source_allowed("::ffff:10.1.2.200", allowed)
    assert source_allowed("127.0.0.1", allowed)
    assert source_allowed("fd00::5", allowed)
    assert not source_allowed("10.1.3.1", allowed)
    assert not source_allowed("127.0.0.2", allowed)
    assert not source_allowed("::1", allowed)
    # No list: everyone (today's default); an unreadable address only fails a real list.
    assert source_allowed("10.9.9.9", [])
    assert source_allowed("", [])


# -- the DICOM caller check ------------------------------------------------------------------

CALLERS = [
    {"ae_title": "CT_ED_1", "hosts": ["10.1.2.0/24"]},
    {"ae_title": "CT_ED_1", "hosts": ["10.9.0.7"]},  # a second entry adds addresses
    {"ae_title": "MR_1", "hosts": ["10.1.5.3", "fd00::/8"]},
]


def test_no_allow_list_admits_everyone_as_today() -> None:
    dicom = _dicom()
    assert dicom.allowed_callers == [] and not dicom.called_ae_title_required
    assert check_association(dicom, "ANYONE", "ANY-SCP", "203.0.113.9") is None


def test_allowed_caller_from_an_allowed_address() -> None:
    dicom = _dicom(allowed_callers=CALLERS)
    assert check_association(dicom, "CT_ED_1", "RADTRIAGE", "10.1.2.44") is None
    assert check_association(dicom, "CT_ED_1 ", " RADTRIAGE", "10.9.0.7") is None  # spaces pad AE titles
    assert check_association(dicom, "MR_1", "RADTRIAGE", "fd00::1:2") is None


def test_unknown_calling_ae_is_rejected_as_not_recognised() -> None:
    dicom = _dicom(allowed_callers=CALLERS)
    for title in ("CT_ED_2", "ct_ed_1", "", "CT_ED_1X"):  # AE titles are case-sensitive
        refusal = check_association(dicom, title, "RADTRIAGE", "10.1.2.44")
        assert refusal is not None and refusal.reason == "calling_ae_unknown"
        assert refusal.diagnostic == CALLING_AE_NOT_RECOGNISED


def test_known_ae_from_another_address_is_rejected() -> None:
    dicom = _dicom(allowed_callers=CALLERS)
    # MR_1's address is not CT_ED_1's: addresses are per AE title.
    for address in ("10.1.3.1", "10.1.5.3", "::1", "garbage"):
        refusal = check_association(dicom, "CT_ED_1", "RADTRIAGE", address)
        assert refusal is not None and refusal.reason == "address_not_allowed"
        assert refusal.diagnostic == CALLING_AE_NOT_RECOGNISED
        assert address not in refusal.text and "CT_ED_1" not in refusal.text  # the log adds them


def test_called_ae_title_must_be_ours_when_callers_are_listed() -> None:
    dicom = _dicom(allowed_callers=CALLERS)
    assert dicom.called_ae_title_required
    refusal = check_association(dicom, "CT_ED_1", "ANY-SCP", "10.1.2.44")
    assert refusal is not None and refusal.reason == "called_ae_mismatch"
    assert refusal.diagnostic == CALLED_AE_NOT_RECOGNISED
    # Explicitly off, or on without an allow-list.
    assert (
        check_association(
            _dicom(allowed_callers=CALLERS, require_called_ae_title=False), "CT_ED_1", "X", "10.1.2.1"
        )
        is None
    )
    strict = _dicom(require_called_ae_title=True, ae_title="PACS_IN")
    assert check_association(strict, "ANYONE", "PACS_IN", "1.2.3.4") is None
    refusal = check_association(strict, "ANYONE", "RADTRIAGE", "1.2.3.4")
    assert refusal is not None and refusal.reason == "called_ae_mismatch"


def test_refusal_reasons_are_a_fixed_list() -> None:
    assert REASONS == (
        "calling_ae_unknown",
        "address_not_allowed",
        "called_ae_mismatch",
        "internal_error",
        "tls_handshake_failed",
        # pynetdicom's own rejections (issue 16: rejected associations are counted too).
        "too_many_associations",
        "user_identity_failed",
        "other",
    )


# -- settings: sources and errors at start ---------------------------------------------------


def test_allow_lists_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RADTRIAGE_CONFIG", str(tmp_path / "none.yaml"))
    monkeypatch.setenv(
        "RADTRIAGE_DICOM__ALLOWED_CALLERS", '[{"ae_title": "CT_ED_1", "hosts": ["10.1.2.0/24", "::1"]}]'
    )
    monkeypatch.setenv("RADTRIAGE_HL7__ALLOWED_SOURCES", '["10.0.0.0/8", "127.0.0.1"]')
    monkeypatch.setenv("RADTRIAGE_HL7__TLS__ENABLED", "true")
    monkeypatch.setenv("RADTRIAGE_HL7__TLS__CERT_FILE", "/etc/radtriage/hl7.pem")
    monkeypatch.setenv("RADTRIAGE_HL7__TLS__KEY_FILE", "/etc/radtriage/hl7.key")
    monkeypatch.setenv("RADTRIAGE_HL7__TLS__KEY_PASSWORD", "s3cret")
    s = Settings()
    (caller,) = s.dicom.allowed_callers
    assert caller.ae_title == "CT_ED_1"
    assert caller.hosts == [ipaddress.ip_network("10.1.2.0/24"), ipaddress.ip_network("::1")]
    assert s.hl7.allowed_sources == [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1")]
    assert s.hl7.tls.key_password is not None and s.hl7.tls.key_password.get_secret_value() == "s3cret"
    # The secret is masked wherever settings are shown, in clear only for `up`'s children.
    assert "s3cret" not in repr(s) and "s3cret" not in s.model_dump_json()
    inherited = Settings.model_validate_json(s.inheritable_json())
    assert inherited.hl7.tls.key_password is not None
    assert inherited.hl7.tls.key_password.get_secret_value() == "s3cret"
    assert inherited.dicom.allowed_callers == s.dicom.allowed_callers


def test_allow_lists_from_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "radtriage.yaml"
    config.write_text(
        "dicom:\n"
        "  allowed_callers:\n"
        "    - {ae_title: CT_ED_1, hosts: [10.1.2.0/24]}\n"
        "    - ae_title: MR_1\n"
        "      hosts: [10.1.5.3]\n"
        "  tls: {enabled: true, cert_file: /c.pem, key_file: /k.pem}\n"
        "  plain_enabled: false\n"
        "hl7:\n"
        "  allowed_sources: [10.1.0.0/16]\n"
    )
    monkeypatch.setenv("RADTRIAGE_CONFIG", str(config))
    s = Settings()
    assert [c.ae_title for c in s.dicom.allowed_callers] == ["CT_ED_1", "MR_1"]
    assert s.dicom.tls.enabled and not s.dicom.plain_enabled and s.dicom.tls_port == 2762
    assert s.hl7.allowed_sources == [ipaddress.ip_network("10.1.0.0/16")]


@pytest.mark.parametrize(
    ("dicom", "message"),
    [
        (
            {"allowed_callers": [{"ae_title": "CT_ED_1", "hosts": ["10.1.2.5/24"]}]},
            "did you mean 10.1.2.0/24",
        ),
        ({"allowed_callers": [{"ae_title": "CT_ED_1", "hosts": ["scanner.local"]}]}, "not an IP address"),
        ({"allowed_callers": [{"ae_title": "CT_ED_1", "hosts": []}]}, "at least 1 item"),
        ({"allowed_callers": [{"ae_title": "CT_ED_1"}]}, "hosts"),
        (
            {"allowed_callers": [{"ae_title": "A_TITLE_LONGER_THAN_16", "hosts": ["10.0.0.1"]}]},
            "not a DICOM AE title",
        ),
        ({"allowed_callers": [{"ae_title": "BAD\\AE", "hosts": ["10.0.0.1"]}]}, "not a DICOM AE title"),
        ({"allowed_callers": [{"ae_title": "   ", "hosts": ["10.0.0.1"]}]}, "not a DICOM AE title"),
        ({"tls": {"enabled": True, "cert_file": "/c.pem"}}, "cert_file and key_file"),
        (
            {
                "tls": {
                    "enabled": True,
                    "cert_file": "/c",
                    "key_file": "/k",
                    "key_password": "p",
                    "key_password_file": "/p",
                }
            },
            "not both",
        ),
        ({"plain_enabled": False}, "nothing would listen"),
    ],
)
def test_bad_dicom_settings_are_clear_errors(dicom: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(dicom=dicom)  # type: ignore[arg-type]


def test_bad_hl7_source_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RADTRIAGE_CONFIG", str(tmp_path / "none.yaml"))
    monkeypatch.setenv("RADTRIAGE_HL7__ALLOWED_SOURCES", '["10.1.2.0/24", "10.1.300.0/24"]')
    with pytest.raises(
        ValidationError, match=r"hl7.allowed_sources.1[\s\S]*'10.1.300.0/24' is not an IP address"
    ):
        Settings()


# -- the TLS context -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls(pki: Pki, **kw: object) -> TlsSettings:
    return TlsSettings.model_validate(
        {"enabled": True, "cert_file": pki.server_cert, "key_file": pki.server_key, **kw}
    )


def test_server_context(pki: Pki, tmp_path: Path) -> None:
    context = server_context(_tls(pki), "hl7.tls")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2 and context.verify_mode == ssl.CERT_NONE
    mutual = server_context(_tls(pki, client_ca_file=pki.ca), "hl7.tls")
    assert mutual.verify_mode == ssl.CERT_REQUIRED
    # An encrypted key, with its password given directly or in a file (a trailing newline is not part of it).
    server_context(_tls(pki, key_file=pki.server_key_encrypted, key_password=SERVER_KEY_PASSWORD), "x")
    password_file = tmp_path / "password"
    password_file.write_text(SERVER_KEY_PASSWORD + "\n")
    server_context(_tls(pki, key_file=pki.server_key_encrypted, key_password_file=password_file), "x")


def test_unusable_tls_settings_fail_at_start_with_the_setting_named(pki: Pki, tmp_path: Path) -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"cert_file": tmp_path / "missing.pem"}, r"dicom.tls.cert_file .*missing.pem: no such file"),
        ({"key_file": pki.client_key}, r"cannot use certificate .* \(KEY_VALUES_MISMATCH\)"),
        (
            {"key_file": pki.server_key_encrypted},
            r"dicom.tls.key_file .* is encrypted: set dicom.tls.key_password",
        ),
        ({"key_file": pki.server_key_encrypted, "key_password": "wrong"}, r"cannot use certificate"),
        (
            {"key_file": pki.server_key_encrypted, "key_password_file": tmp_path / "nope"},
            r"key_password_file .*nope",
        ),
        ({"client_ca_file": pki.server_key}, r"dicom.tls.client_ca_file .* not a PEM CA certificate"),
        ({"client_ca_file": tmp_path / "ca.pem"}, r"dicom.tls.client_ca_file .*ca.pem: no such file"),
    ]
    for override, message in cases:
        with pytest.raises(TlsConfigError, match=message) as caught:
            server_context(_tls(pki, **override), "dicom.tls")
        assert "wrong" not in str(caught.value)  # a password never appears in the error
