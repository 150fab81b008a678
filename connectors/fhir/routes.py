"""FHIR R4 REST handlers: create ServiceRequest / ImagingStudy, transaction/batch, metadata.

A 201 (or a 2xx entry in a Bundle response) is answered only after Kafka acknowledged
the OrderEvent with acks=all; if it does not in time, 503 with Retry-After. Parsing,
validation and mapping (pure, in parsing/mapping/bundle) run on a worker thread so a
large or hostile payload never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import wraps
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web
from opentelemetry import propagate, trace

from connectors.fhir.bundle import Accepted, EntryResult, history_location, plan_bundle, response_bundle
from connectors.fhir.capability import capability_statement
from connectors.fhir.mapping import accept
from connectors.fhir.outcome import FHIR_JSON, FhirError, Issue, error, outcome_bytes, transient
from connectors.fhir.parsing import SUPPORTED_TYPES, parse_json
from connectors.fhir.results_view import RESULTS_VIEW
from connectors.http.body import read_limited
from connectors.http.events import PublishError
from connectors.http.state import PUBLISHER, SETTINGS, base_url
from schemas.orders import OrderEvent

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

# application/fhir+json is FHIR's; plain JSON and the DSTU2-era name are what many
# integration engines send.
JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
RETRY_AFTER_S = 5

# FHIR issue-type for each HTTP status the server itself produces.
_ISSUE_CODE = {
    400: "structure",
    404: "not-supported",
    405: "not-supported",
    413: "too-long",
    415: "not-supported",
    500: "exception",
    503: "transient",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _software_version() -> str:
    try:
        return version("radtriage")
    except PackageNotFoundError:
        return "0+unknown"


def fhir_response(
    status: int, body: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    payload = json.dumps(body, ensure_ascii=False).encode() if body is not None else None
    return web.Response(
        status=status, body=payload, content_type=FHIR_JSON, charset="utf-8", headers=dict(headers or {})
    )


def error_response(exc: FhirError) -> web.Response:
    return web.Response(
        status=exc.status,
        body=outcome_bytes(exc.issues),
        content_type=FHIR_JSON,
        charset="utf-8",
        headers=dict(exc.headers),
    )


def render_error(status: int, message: str, headers: Mapping[str, str]) -> web.Response:
    """The server middleware's errors under /fhir (404, 405, 413, 500...) as OperationOutcomes."""
    return error_response(FhirError(status, [Issue(_ISSUE_CODE.get(status, "processing"), message)], headers))


def fhir_handler(handler: Handler) -> Handler:
    """Turn a FhirError raised anywhere in `handler` into its OperationOutcome response."""

    @wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except FhirError as exc:
            if exc.status >= 500:
                log.warning("FHIR %s %s answered %s", request.method, request.path[:64], exc)
            return error_response(exc)

    return wrapped


async def _read_json_body(request: web.Request) -> bytes:
    if request.content_type not in JSON_TYPES:
        raise error(
            415,
            "not-supported",
            f"Content-Type {request.content_type[:64]!r} not supported: send application/fhir+json",
        )
    return await read_limited(request, request.app[SETTINGS].http.max_fhir_bytes)


def _traceparent() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


async def publish_order(request: web.Request, event: OrderEvent) -> None:
    """Publish with acks=all; a FhirError 503 (transient, Retry-After) if Kafka does not ack."""
    settings = request.app[SETTINGS]
    try:
        await request.app[PUBLISHER].publish(
            settings.topics.orders, event.accession_number, event, _traceparent()
        )
    except PublishError as exc:
        log.warning("order event %s not published: %s", event.source_message_id, exc)
        raise transient(
            "the order could not be stored durably (event log unavailable); not accepted, retry later",
            RETRY_AFTER_S,
        ) from None


def _unsupported_type(resource_type: str) -> FhirError:
    return error(
        404,
        "not-supported",
        f"resource type {resource_type[:64]!r} not supported here (only {', '.join(SUPPORTED_TYPES)})",
    )


def _parse_and_accept(body: bytes, resource_type: str, resource_id: str) -> tuple[Any, OrderEvent]:
    data = parse_json(body)
    return data, accept(data, resource_type, resource_id=resource_id)


def _created_body(
    prefer: str, data: Mapping[str, Any], resource_id: str, location: str, now: datetime
) -> dict[str, Any] | None:
    """FHIR create's body per the Prefer header: minimal, OperationOutcome, or (default)
    the resource as created, with its server-assigned id and version."""
    if "return=minimal" in prefer:
        return None
    if "return=operationoutcome" in prefer.lower():
        return {
            "resourceType": "OperationOutcome",
            "issue": [
                {"severity": "information", "code": "informational", "diagnostics": f"created {location}"}
            ],
        }
    meta = dict(data.get("meta") or {}) if isinstance(data.get("meta"), Mapping) else {}
    meta.update(versionId="1", lastUpdated=now.isoformat())
    return {**data, "id": resource_id, "meta": meta}


@fhir_handler
async def create(request: web.Request) -> web.StreamResponse:
    """`POST /fhir/{type}`; any other method on a supported type is 405."""
    resource_type = request.match_info["type"]
    if resource_type == "metadata":
        raise FhirError(405, [Issue("not-supported", "metadata is read with GET")], {"Allow": "GET, HEAD"})
    if resource_type not in SUPPORTED_TYPES:
        raise _unsupported_type(resource_type)
    if request.method != "POST":
        raise FhirError(
            405,
            [
                Issue(
                    "not-supported", f"{request.method} not supported on {resource_type}: only POST (create)"
                )
            ],
            {"Allow": "POST"},
        )
    body = await _read_json_body(request)
    resource_id = str(uuid.uuid4())
    with tracer.start_as_current_span(
        "fhir.create", attributes={"fhir.resource_type": resource_type, "fhir.resource_id": resource_id}
    ):
        data, event = await asyncio.to_thread(_parse_and_accept, body, resource_type, resource_id)
        await publish_order(request, event)
    now = datetime.now(UTC)
    location = history_location(base_url(request), resource_type, resource_id)
    headers = {"Location": location, "ETag": 'W/"1"', "Last-Modified": format_datetime(now, usegmt=True)}
    return fhir_response(
        201, _created_body(request.headers.get("Prefer", ""), data, resource_id, location, now), headers
    )


@fhir_handler
async def instance(request: web.Request) -> web.StreamResponse:
    """`/fhir/{type}/{id...}`: resources are events here, not stored — no read/update/delete."""
    resource_type = request.match_info["type"]
    if resource_type not in SUPPORTED_TYPES:
        raise _unsupported_type(resource_type)
    raise FhirError(
        405,
        [Issue("not-supported", f"{resource_type} instances cannot be read, updated or deleted here")],
        {"Allow": ""},
    )


def _plan(body: bytes) -> Any:
    return plan_bundle(parse_json(body), lambda: str(uuid.uuid4()))


@fhir_handler
async def transaction_or_batch(request: web.Request) -> web.StreamResponse:
    """`POST /fhir` with a transaction or batch Bundle."""
    if request.method != "POST":
        raise FhirError(
            405, [Issue("not-supported", "only POST of a transaction or batch Bundle")], {"Allow": "POST"}
        )
    body = await _read_json_body(request)
    with tracer.start_as_current_span("fhir.bundle") as span:
        plan = await asyncio.to_thread(_plan, body)
        span.set_attribute("fhir.bundle_type", plan.kind)
        span.set_attribute("fhir.entries", len(plan.entries))
        results: list[EntryResult] = []
        if plan.kind == "transaction":
            refusal = plan.refusal()
            if refusal is not None:
                raise refusal
            # Not atomic in Kafka: if publishing stops part-way, the sender gets 503 and
            # re-sends the whole Bundle; the entries already published arrive twice, which
            # the order join absorbs (same accession, same facts).
            for entry in plan.entries:
                assert isinstance(entry, Accepted)
                await publish_order(request, entry.event)
            results = list(plan.entries)
        else:
            for entry in plan.entries:
                if isinstance(entry, Accepted):
                    try:
                        await publish_order(request, entry.event)
                    except FhirError as exc:
                        results.append(exc)
                        continue
                results.append(entry)
    bundle = response_bundle(plan.kind, results, base_url=base_url(request), now=datetime.now(UTC))
    return fhir_response(200, bundle)


@fhir_handler
async def metadata(request: web.Request) -> web.StreamResponse:
    read_search = RESULTS_VIEW in request.app
    statement = capability_statement(base_url(request), _software_version(), read_search)
    return fhir_response(200, statement)


def add_routes(app: web.Application) -> None:
    # Order matters: /fhir/metadata before the /fhir/{type} pattern that would match it.
    app.router.add_get("/fhir/metadata", metadata)
    app.router.add_route("*", "/fhir", transaction_or_batch)
    app.router.add_route("*", "/fhir/{type}", create)
    app.router.add_route("*", "/fhir/{type}/{rest:.+}", instance)
