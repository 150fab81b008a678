"""TLS for the HTTP port: the server's ssl.SSLContext, and the one radtriage's own clients use.

Everything is checked at start-up (files readable, key matches certificate, the auth
mode has the client CA it needs), so a wrong path is one clear line before the port opens, not
a failed handshake per client later.
"""

from __future__ import annotations

import re
import ssl

from radtriage.settings import HttpSettings
from radtriage.tls import TlsConfigError, readable_file
from radtriage.tls import server_context as listener_context

__all__ = ["TlsConfigError", "client_context", "server_context"]

_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def server_context(http: HttpSettings) -> ssl.SSLContext | None:
    """The context for aiohttp's site, or None when TLS is off.

    The certificate, key and client CA are the listeners' common TlsSettings
    (radtriage/tls.py); what is HTTP's own is that the auth mode needs a client CA, and
    that with bearer_or_mtls a client certificate is optional (a token will do)."""
    tls, mode = http.tls, http.auth.mode
    if not tls.enabled:
        if mode in ("mtls", "bearer_or_mtls") or tls.client_ca_file is not None:
            raise TlsConfigError(
                "client certificates (http.auth.mode mtls/bearer_or_mtls, http.tls.client_ca_file) "
                "need http.tls.enabled"
            )
        return None
    if tls.client_ca_file is None and mode in ("mtls", "bearer_or_mtls"):
        raise TlsConfigError(f"http.auth.mode {mode} needs http.tls.client_ca_file")
    context = listener_context(tls, "http.tls")
    if tls.client_ca_file is not None and mode == "bearer_or_mtls":
        # A client with a token but no certificate must still get through the handshake.
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(http: HttpSettings) -> ssl.SSLContext:
    """For radtriage's own clients of this server (the demo) on this host: trust exactly the
    server's own certificate (its first PEM block), whoever issued it and whatever names
    it carries; the pin is the certificate itself, so no hostname check is needed."""
    cert = readable_file(http.tls.cert_file, "http.tls.cert_file")
    found = _PEM_CERT.search(cert.read_text(encoding="ascii", errors="replace"))
    if found is None:
        raise TlsConfigError(f"http.tls.cert_file: {cert} holds no PEM certificate")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=found.group(0))
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context
