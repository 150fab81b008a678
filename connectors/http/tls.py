"""TLS for the HTTP port: the server's ssl.SSLContext, and the one radtriage's own clients use.

Everything is checked at start-up (files readable, key matches certificate, the auth
mode has the client CA it needs), so a wrong path is one clear line before the port opens, not
a failed handshake per client later.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

from radtriage.settings import HttpSettings

_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


class TlsConfigError(ValueError):
    """TLS settings that cannot work (or that the auth mode needs); the message names the key."""


def _file(path: Path | None, key: str) -> Path:
    if path is None:
        raise TlsConfigError(f"{key} is required")
    if not path.is_file():
        raise TlsConfigError(f"{key}: {path} is not a readable file")
    return path


def server_context(http: HttpSettings) -> ssl.SSLContext | None:
    """The context for aiohttp's site, or None when TLS is off."""
    tls, mode = http.tls, http.auth.mode
    if not tls.enabled:
        if mode in ("mtls", "bearer_or_mtls") or tls.client_ca_file is not None:
            raise TlsConfigError(
                "client certificates (http.auth.mode mtls/bearer_or_mtls, http.tls.client_ca_file) "
                "need http.tls.enabled"
            )
        return None
    cert = _file(tls.cert_file, "http.tls.cert_file")
    key = _file(tls.key_file, "http.tls.key_file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            "http.tls.cert_file/key_file: not a PEM certificate and its matching unencrypted key "
            f"({exc.reason})"
        ) from None
    if tls.client_ca_file is not None:
        ca = _file(tls.client_ca_file, "http.tls.client_ca_file")
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise TlsConfigError(
                f"http.tls.client_ca_file: not a PEM CA certificate ({exc.reason})"
            ) from None
        # bearer_or_mtls: a client with a token but no certificate must still get through the handshake.
        context.verify_mode = ssl.CERT_OPTIONAL if mode == "bearer_or_mtls" else ssl.CERT_REQUIRED
    elif mode in ("mtls", "bearer_or_mtls"):
        raise TlsConfigError(f"http.auth.mode {mode} needs http.tls.client_ca_file")
    return context


def client_context(http: HttpSettings) -> ssl.SSLContext:
    """For radtriage's own clients of this server (the demo) on this host: trust exactly the
    server's own certificate (its first PEM block), whoever issued it and whatever names
    it carries; the pin is the certificate itself, so no hostname check is needed."""
    cert = _file(http.tls.cert_file, "http.tls.cert_file")
    found = _PEM_CERT.search(cert.read_text(encoding="ascii", errors="replace"))
    if found is None:
        raise TlsConfigError(f"http.tls.cert_file: {cert} holds no PEM certificate")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=found.group(0))
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context
