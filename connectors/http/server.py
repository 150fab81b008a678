"""The HTTP intake server: FHIR R4 (`/fhir`), DICOMweb STOW-RS (`/dicomweb/studies`), `/healthz`,
`/metrics`, and any page the command adds on the same port (`pages`: the operator page).

`build_app` wires the routes and middleware around a publisher and a blob store;
`start_http` runs it in the current event loop (tests, embedding) and `run_http` is
the `radtriage http` process: serve until SIGTERM/SIGINT, then stop accepting, let
requests in flight finish (bounded), and close the publisher.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web
from pydicom import config as pydicom_config

from connectors.dicomweb import stow
from connectors.fhir import read as fhir_read
from connectors.fhir import routes as fhir
from connectors.fhir.results_view import RESULTS_VIEW, ResultsView
from connectors.http import notify_ack
from connectors.http.auth import make_auth_middleware, token_store
from connectors.http.events import AsyncPublisher
from connectors.http.health import healthz
from connectors.http.middleware import Area, InFlight, make_middlewares, plain_json_error
from connectors.http.state import BLOBS, IN_FLIGHT, PAGES, PUBLISHER, SETTINGS, Page
from connectors.http.tls import TlsConfigError, server_context
from connectors.http.tokens import TokenError, TokenStore
from connectors.publisher import EventPublisher
from connectors.serving import serve_until_signalled
from radtriage import metrics
from radtriage.blobstore import LocalBlobStore
from radtriage.settings import Settings

log = logging.getLogger(__name__)

# Anything outside /fhir and /dicomweb (health, unknown paths) takes no real body.
OTHER_MAX_BODY = 64 << 10
# Beyond the produce timeout, the time shutdown gives requests in flight.
SHUTDOWN_GRACE_S = 5.0


def build_app(
    settings: Settings,
    publisher: EventPublisher,
    blobs: LocalBlobStore,
    *,
    owns_publisher: bool = False,
    tokens: TokenStore | None = None,
    pages: Sequence[Page] = (),
    results_view: ResultsView | None = None,
) -> web.Application:
    """The application; closes `publisher` on cleanup only if `owns_publisher`.

    `tokens`: the accepted bearer tokens (loaded from the settings when not given).
    `pages`: served beside the intake (radtriage/cli.py adds the operator page).
    `results_view`: what FHIR read/search answers from (None: they answer 404 not-supported);
    started and stopped with the app.
    """
    areas = [
        Area("/fhir", settings.http.max_fhir_bytes, fhir.render_error),
        Area("/dicomweb", settings.http.max_stow_bytes, plain_json_error),
    ]
    in_flight = InFlight()
    observe, standard_errors = make_middlewares(areas, Area("", OTHER_MAX_BODY, plain_json_error), in_flight)
    # Authentication inside `observe` (a refusal is traced, access-logged and counted like
    # any answer) and before everything else: no body is read, no handler runs for a refusal.
    authenticate = make_auth_middleware(settings.http.auth, tokens or token_store(settings.http.auth))
    app = web.Application(
        middlewares=[observe, authenticate, standard_errors],  # type: ignore[list-item]
        # Handlers read bodies themselves, with the limits above; this only bounds
        # aiohttp's own helpers should anything use them.
        client_max_size=max(settings.http.max_fhir_bytes, OTHER_MAX_BODY),
    )
    app[SETTINGS] = settings
    app[PUBLISHER] = AsyncPublisher(publisher, owned=owns_publisher)
    app[BLOBS] = blobs
    app[IN_FLIGHT] = in_flight
    app.router.add_get("/healthz", healthz)
    # Prometheus text format: every local process's metrics, lag and model readiness.
    app.router.add_get("/metrics", metrics.metrics_handler(settings))
    if results_view is not None:
        app[RESULTS_VIEW] = results_view
    fhir_read.add_routes(app)  # before fhir's: its patterns would match these paths
    fhir.add_routes(app)
    stow.add_routes(app)
    # A notification's acknowledgement link (issue 19): public, its signed token is the credential.
    notify_ack.add_routes(app)
    app[PAGES] = tuple(pages)
    for page in pages:
        page.add_routes(app)

    async def close_publisher(app: web.Application) -> None:
        # Flushing may block for the produce timeout: not on the loop.
        await asyncio.to_thread(app[PUBLISHER].close)

    app.on_cleanup.append(close_publisher)
    if results_view is not None:
        view = results_view

        async def start_view(app: web.Application) -> None:
            view.start()

        async def stop_view(app: web.Application) -> None:
            await asyncio.to_thread(view.stop)

        app.on_startup.append(start_view)
        app.on_cleanup.append(stop_view)
    return app


@dataclass
class HttpHandle:
    runner: web.AppRunner
    port: int
    grace_s: float

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), run cleanup hooks."""
        for site in list(self.runner.sites):
            await site.stop()  # no new connections
        app = self.runner.app
        # Open pages' event streams (the operator page's) never end by themselves: end them first.
        for page in app[PAGES]:
            page.end_streams(app)
        in_flight = app[IN_FLIGHT]
        if not await in_flight.wait_idle(self.grace_s):
            log.warning(
                "%d request(s) still in flight after %.0f s: closing anyway", in_flight.count, self.grace_s
            )
        # Now aiohttp closes the (idle) connections, and the publisher is flushed and closed.
        await self.runner.cleanup()


async def start_http(
    settings: Settings, publisher: EventPublisher | None = None, pages: Sequence[Page] = ()
) -> HttpHandle:
    """Serve on `settings.http.bind_address:port` (port 0: any free port, see `.port`).

    A publisher passed in stays the caller's; otherwise one is created and closed on stop.
    Bad TLS or auth settings raise TlsConfigError / TokenError before anything starts.
    """
    ssl_context = server_context(settings.http)
    tokens = token_store(settings.http.auth)
    # As in the DICOM listener: pydicom must not log (possibly PHI-bearing) invalid
    # values while decoding; refusals carry our own reasons.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    owns = publisher is None
    publisher = publisher or EventPublisher(
        settings.kafka,
        timeout_s=settings.kafka.produce_timeout_s,
        client_id="radtriage-http",
    )
    app = build_app(
        settings,
        publisher,
        LocalBlobStore(settings.blob_dir),
        owns_publisher=owns,
        tokens=tokens,
        pages=pages,
        results_view=ResultsView(settings) if settings.fhir_search.enabled else None,
    )
    grace_s = settings.kafka.produce_timeout_s + SHUTDOWN_GRACE_S
    runner = web.AppRunner(
        app,
        # Our own access log (middleware) logs route templates, never raw paths or queries.
        access_log=None,
        handle_signals=False,
        shutdown_timeout=grace_s,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.http.bind_address, settings.http.port, ssl_context=ssl_context)
    await site.start()
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    port = int(sockets[0].getsockname()[1]) if sockets else settings.http.port
    return HttpHandle(runner, port, grace_s)


async def _serve(settings: Settings, pages: Sequence[Page]) -> None:
    def announce(handle: HttpHandle) -> None:
        log.info(
            "HTTP intake listening on %s://%s:%d (FHIR /fhir, STOW-RS /dicomweb/studies, /healthz), auth %s",
            settings.http.scheme,
            settings.http.bind_address,
            handle.port,
            settings.http.auth.mode,
        )

    await serve_until_signalled(
        lambda: start_http(settings, pages=pages),
        announce,
        log,
        stopping="stopping: finishing requests in flight",
        stopped="HTTP intake stopped",
    )


def run_http(settings: Settings, pages: Sequence[Page] = ()) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully. Exits 2 on unusable TLS/auth settings."""
    metrics.start_process_metrics(settings, serve=False)  # /metrics is on our own port
    try:
        asyncio.run(_serve(settings, pages))
    except (TlsConfigError, TokenError) as exc:
        log.error("HTTP intake not started: %s", exc)
        raise SystemExit(2) from None
