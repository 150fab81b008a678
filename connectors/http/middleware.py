"""What every request goes through: a SERVER span, a PHI-free access log line, body-size
limits, and the guarantee that no input — nor any bug — escapes as anything but a
standard error response (OperationOutcome under /fhir, JSON under /dicomweb).
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from connectors.http.body import BodyTooLarge, check_declared_length
from radtriage import metrics

log = logging.getLogger("connectors.http.access")
errors_log = logging.getLogger("connectors.http.server")
tracer = trace.get_tracer(__name__)

# Renders an error for a path prefix: (status, message, extra headers) -> response.
ErrorRenderer = Callable[[int, str, Mapping[str, str]], web.Response]


class HttpError(Exception):
    """A refusal a handler raises; rendered in its area's error format."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


@dataclass(frozen=True)
class Area:
    """A part of the URL space with its own body limit and error format."""

    prefix: str
    max_body: int
    render_error: ErrorRenderer


class InFlight:
    """Requests being handled right now, so shutdown can wait for them.

    aiohttp's own shutdown stops reading from every connection at once, which would
    stall an upload in progress (a STOW-RS series) until it times out; the server
    instead stops accepting, waits here, and only then lets aiohttp close connections.
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def exit(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no request is in flight; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


def route_template(request: web.Request) -> str:
    """The matched route's template (`/fhir/{type}`), never the raw path: paths may carry
    whatever a client typed, and templates keep the log's cardinality low."""
    resource = getattr(request.match_info.route, "resource", None)
    return resource.canonical if resource is not None else "<unmatched>"


def plain_json_error(status: int, message: str, headers: Mapping[str, str]) -> web.Response:
    return web.json_response({"status": status, "error": message}, status=status, headers=dict(headers))


def _area(areas: Sequence[Area], path: str, default: Area) -> Area:
    for area in areas:
        if path == area.prefix or path.startswith(area.prefix + "/"):
            return area
    return default


def _log_unexpected(request: web.Request, exc: BaseException) -> None:
    # The traceback's frames (code locations), not the exception's message: a message
    # may quote a value from the request.
    frames = "".join(traceback.format_tb(exc.__traceback__))
    errors_log.error(
        "unexpected %s on %s %s\n%s", type(exc).__name__, request.method, route_template(request), frames
    )


def make_middlewares(
    areas: Sequence[Area], default: Area, in_flight: InFlight
) -> list[Callable[..., object]]:
    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        in_flight.enter()
        try:
            return await _observed(request, handler)
        finally:
            in_flight.exit()

    async def _observed(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        template = route_template(request)
        status = 499  # what stays if the client goes away before an answer
        with tracer.start_as_current_span(
            f"{request.method} {template}",
            # A client that sends traceparent gets its request in its own trace.
            context=propagate.extract(dict(request.headers)),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "http.route": template,
                "url.path": request.path[:512] if template != "<unmatched>" else template,
            },
        ) as span:
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                span.set_attribute("http.response.status_code", status)
                metrics.observe_http_request(request.path, request.match_info.get("type"), status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
                log.info(
                    "%s %s %d %.1fms",
                    request.method,
                    template,
                    status,
                    (time.perf_counter() - started) * 1000,
                )

    @web.middleware
    async def standard_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        area = _area(areas, request.path, default)
        try:
            check_declared_length(request, area.max_body)
            return await handler(request)
        except HttpError as exc:
            return area.render_error(exc.status, exc.message, exc.headers)
        except BodyTooLarge as exc:
            # The rest of the body is not worth reading: close the connection after answering.
            return area.render_error(413, str(exc), {"Connection": "close"})
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
            return area.render_error(exc.status, exc.reason, headers)
        except Exception as exc:
            _log_unexpected(request, exc)
            return area.render_error(500, "internal error; the request was not processed", {})

    return [observe, standard_errors]
