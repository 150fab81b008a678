"""The server-side ssl.SSLContext of a listener (DICOM, MLLP) from its `TlsSettings`.

Built once when the listener starts, so a missing file, a key that does not match its
certificate or a wrong key password stops the start with a `TlsConfigError` naming the
setting — never a failure on the first sender's connection.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from radtriage.settings import ClientTlsSettings, TlsSettings


class TlsConfigError(ValueError):
    """The TLS settings of a listener cannot be used; the message says which and why."""


def _key_password(tls: TlsSettings, where: str) -> str | Callable[[], str]:
    """The key's password, or for none configured a callback that refuses: without one,
    OpenSSL would prompt for it on the terminal (a service would hang there)."""
    if tls.key_password is not None:
        return tls.key_password.get_secret_value()
    if tls.key_password_file is not None:
        try:
            # One line; the newline an editor or `echo` adds is not part of it.
            return tls.key_password_file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise TlsConfigError(
                f"{where}.key_password_file {tls.key_password_file}: {exc.strerror}"
            ) from None

    def no_password() -> str:
        raise TlsConfigError(f"{where}.key_file {tls.key_file} is encrypted: set {where}.key_password(_file)")

    return no_password


def readable_file(path: Path | None, setting: str) -> Path:
    if path is None:
        raise TlsConfigError(f"{setting} is not set")
    if not path.is_file():
        raise TlsConfigError(f"{setting} {path}: no such file")
    return path


def _trust(context: ssl.SSLContext, path: Path, setting: str) -> None:
    """Verify peers against the CA certificate(s) at `path`, the setting named in errors."""
    ca = readable_file(path, setting)
    try:
        context.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{setting} {ca}: not a PEM CA certificate ({exc.reason or exc})") from None


def server_context(tls: TlsSettings, where: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context; `where` (e.g. "dicom.tls") prefixes every error message."""
    cert = readable_file(tls.cert_file, f"{where}.cert_file")
    key = readable_file(tls.key_file, f"{where}.key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.2 is the floor of BCP 195 (which PS3.15's secure transport profiles follow).
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_key_password(tls, where))
    except ssl.SSLError as exc:
        # Not the exception text alone: OpenSSL's reason (e.g. KEY_VALUES_MISMATCH,
        # bad decrypt) is short and names no secret.
        raise TlsConfigError(
            f"{where}: cannot use certificate {cert} with key {key} ({exc.reason or exc}); "
            "is the key the certificate's, and its password right?"
        ) from None
    if tls.client_ca_file is not None:
        _trust(context, tls.client_ca_file, f"{where}.client_ca_file")
        # Mutual TLS: no certificate, or one the CA did not sign, fails the handshake.
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: ClientTlsSettings, where: str) -> ssl.SSLContext:
    """A TLS 1.2+ client context for an outbound connection (the ORU sender): the peer's
    certificate checked against `ca_file` (else the system's CAs) and its host name; our
    certificate presented when `cert_file`/`key_file` are set (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_file is not None:
        _trust(context, tls.ca_file, f"{where}.ca_file")
    if tls.cert_file is not None:
        cert = readable_file(tls.cert_file, f"{where}.cert_file")
        key = readable_file(tls.key_file, f"{where}.key_file")
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise TlsConfigError(
                f"{where}: cannot use certificate {cert} with key {key} ({exc.reason or exc})"
            ) from None
    return context
