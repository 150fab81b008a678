"""What every HTTP handler shares: the settings, the publisher, the blob store."""

from __future__ import annotations

from aiohttp import web

from connectors.blobstore import LocalBlobStore
from connectors.http.events import AsyncPublisher
from connectors.http.middleware import InFlight
from radtriage.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
PUBLISHER = web.AppKey("publisher", AsyncPublisher)
BLOBS = web.AppKey("blobs", LocalBlobStore)
IN_FLIGHT = web.AppKey("in_flight", InFlight)


def base_url(request: web.Request) -> str:
    """The URL prefix for Location headers and RetrieveURLs: the configured public base
    URL (behind a proxy), else what the client used to reach us."""
    configured = request.app[SETTINGS].http.public_base_url.rstrip("/")
    return configured or f"{request.scheme}://{request.host}"
