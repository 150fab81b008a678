"""What every HTTP handler shares: the settings, the publisher, the blob store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from aiohttp import web

from connectors.http.events import AsyncPublisher
from connectors.http.middleware import InFlight
from radtriage.blobstore import LocalBlobStore
from radtriage.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
PUBLISHER = web.AppKey("publisher", AsyncPublisher)
BLOBS = web.AppKey("blobs", LocalBlobStore)
IN_FLIGHT = web.AppKey("in_flight", InFlight)


class Page(Protocol):
    """Something a command serves beside the intake on the same port (the operator page,
    radtriage/operator/page.py): routes added to the app, long-lived streams ended first
    on shutdown. The intake does not know what it is."""

    def add_routes(self, app: web.Application) -> None: ...

    def end_streams(self, app: web.Application) -> None: ...


PAGES = web.AppKey("pages", Sequence[Page])


def base_url(request: web.Request) -> str:
    """The URL prefix for Location headers and RetrieveURLs: the configured public base
    URL (behind a proxy), else what the client used to reach us."""
    configured = request.app[SETTINGS].http.public_base_url.rstrip("/")
    return configured or f"{request.scheme}://{request.host}"
