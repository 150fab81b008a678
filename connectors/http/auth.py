"""Who may use the HTTP port: one middleware around a pure decision.

`decide` takes the path, the Authorization header and the verified client certificate
and says allow/deny with a reason from a fixed list (the refusal counter's label).
Every refusal is a 401 with `WWW-Authenticate: Bearer realm="radtriage"` and a FHIR
OperationOutcome (application/fhir+json), whatever the path: one answer for FHIR
clients, STOW-RS clients, Prometheus and the operator page alike. A wrong token is a
401 like a missing one: the client is not authenticated, which is what 401 says (403
would mean "authenticated but not allowed", and there are no per-route permissions).

Browsers cannot add a bearer header to a page load or an EventSource, so the operator
page's paths also offer `Basic` (any user name, a token as the password): the browser
asks once and then sends it on every request of the page, its event stream and its
fetches. Neither the token nor the header value is ever logged or put on a span.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from aiohttp.typedefs import Handler

from connectors.fhir.outcome import FHIR_JSON, Issue, outcome_bytes
from connectors.http.middleware import route_template
from connectors.http.tokens import B64TOKEN, TokenError, TokenStore, matches
from radtriage import metrics
from radtriage.settings import HttpAuthSettings

log = logging.getLogger("connectors.http.auth")

Mode = Literal["off", "bearer", "mtls", "bearer_or_mtls"]
Reason = Literal[
    "auth_off",
    "public_path",
    "token",
    "client_cert",
    # refusals (the values of radtriage_http_auth_refusals_total{reason}):
    "missing_credentials",
    "malformed_authorization",
    "invalid_token",
    "client_cert_required",
]
REFUSAL_REASONS: tuple[Reason, ...] = (
    "missing_credentials",
    "malformed_authorization",
    "invalid_token",
    "client_cert_required",
)
REALM = "radtriage"
# The operator page (HTML, its event stream, fetches and static files) is used from a browser.
BROWSER_PREFIXES = ("/operator/",)
BROWSER_PATHS = frozenset({"/"})

# What a refused client is told (no detail that helps guessing).
_DIAGNOSTICS: dict[str, str] = {
    "missing_credentials": "authentication required: send Authorization: Bearer <token>",
    "malformed_authorization": "the Authorization header is not 'Bearer <token>'",
    "invalid_token": "the bearer token is not valid",
    "client_cert_required": "a client certificate signed by the configured CA is required",
}


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: Reason


def is_public(path: str, public_paths: Sequence[str]) -> bool:
    """`path` matches an entry exactly, or lies under an entry that ends with '/'."""
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in public_paths)


def presented_token(authorization: str) -> str | None:
    """The token in `Bearer <token>` or `Basic base64(user:token)`; None if malformed."""
    scheme, _, rest = authorization.strip().partition(" ")
    credentials = rest.strip()
    if not credentials or " " in credentials:
        return None
    if scheme.lower() == "bearer":
        return credentials if B64TOKEN.match(credentials) else None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _user, colon, password = decoded.partition(":")
        return password if colon and password else None
    return None


def decide(
    mode: Mode,
    path: str,
    authorization: str | None,
    peer_cert: Mapping[str, Any] | None,
    accepted: Sequence[bytes],
    public_paths: Sequence[str],
) -> Decision:
    """Allow or refuse one request.

    `peer_cert` is the client certificate the TLS handshake verified against the client
    CA (ssl's getpeercert(): empty/None when none was presented); `accepted` the digests
    of the valid tokens.
    """
    if mode == "off":
        return Decision(True, "auth_off")
    if is_public(path, public_paths):
        return Decision(True, "public_path")
    has_cert = bool(peer_cert)
    if mode in ("mtls", "bearer_or_mtls") and has_cert:
        return Decision(True, "client_cert")
    if mode == "mtls":
        return Decision(False, "client_cert_required")
    if authorization is None or not authorization.strip():
        return Decision(False, "missing_credentials")
    token = presented_token(authorization)
    if token is None:
        return Decision(False, "malformed_authorization")
    if matches(token, accepted):
        return Decision(True, "token")
    return Decision(False, "invalid_token")


def is_browser_path(path: str) -> bool:
    return path in BROWSER_PATHS or path.startswith(BROWSER_PREFIXES)


def challenges(mode: Mode, reason: Reason, path: str) -> list[str]:
    """The WWW-Authenticate challenges of a refusal (RFC 6750 error codes where they apply)."""
    if mode == "mtls":
        # No token would help; the challenge still names the realm (a 401 must carry one).
        return [f'Bearer realm="{REALM}"']
    bearer = f'Bearer realm="{REALM}"'
    if reason in ("invalid_token", "malformed_authorization"):
        bearer += ', error="invalid_token"'
    out = [bearer]
    if is_browser_path(path):
        out.append(f'Basic realm="{REALM} operator page", charset="UTF-8"')
    return out


def unauthorized(mode: Mode, reason: Reason, path: str, has_body: bool) -> web.Response:
    headers: list[tuple[str, str]] = [("WWW-Authenticate", c) for c in challenges(mode, reason, path)]
    headers.append(("Cache-Control", "no-store"))
    if has_body:
        # A refused upload (a STOW-RS series) is not worth reading: answer and close.
        headers.append(("Connection", "close"))
    response = web.Response(
        status=401,
        body=outcome_bytes([Issue("login", _DIAGNOSTICS[reason])]),
        content_type=FHIR_JSON,
        charset="utf-8",
    )
    for name, value in headers:
        response.headers.add(name, value)
    return response


def peer_certificate(request: web.Request) -> Mapping[str, Any] | None:
    transport = request.transport
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    return cert if isinstance(cert, Mapping) else None


def token_store(auth: HttpAuthSettings) -> TokenStore:
    """The accepted tokens, loaded now: a bad tokens file fails start-up with its reason."""
    store = TokenStore(auth.tokens, auth.tokens_file)
    count = store.load()
    if auth.mode in ("bearer", "bearer_or_mtls") and count == 0:
        raise TokenError(
            f"http.auth.mode {auth.mode} needs at least one token (http.auth.tokens or http.auth.tokens_file)"
        )
    return store


def make_auth_middleware(settings: HttpAuthSettings, store: TokenStore) -> Callable[..., object]:
    mode: Mode = settings.mode
    public = tuple(settings.public_paths)

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        decision = decide(
            mode,
            request.path,
            request.headers.get("Authorization"),
            peer_certificate(request),
            store.current() if mode in ("bearer", "bearer_or_mtls") else (),
            public,
        )
        if decision.allowed:
            return await handler(request)
        metrics.count_http_auth_refusal(decision.reason)
        # The route template, not the raw path (it may carry what a client typed); never
        # the Authorization header.
        log.warning(
            "refused %s %s from %s: %s",
            request.method,
            route_template(request),
            request.remote or "unknown peer",
            decision.reason,
        )
        return unauthorized(mode, decision.reason, request.path, request.can_read_body)

    return authenticate
