"""FHIR read and search of the results: `GET /fhir/{DiagnosticReport|Observation}[/{id}]`
from the results view (connectors/fhir/results_view.py; docs/ARCHITECTURE.md "FHIR read
and search").

Authorization is the port's (connectors/http/auth.py, before any handler): whoever may
use `/fhir` may read. Every refusal is an OperationOutcome, logged with its reason (never
with the values the client sent: they may be patient identifiers) and counted in
`radtriage_fhir_read_refusals_total`.
"""

from __future__ import annotations

import asyncio
import logging
from email.utils import format_datetime
from typing import Any

from aiohttp import web

from connectors.fhir.outcome import FHIR_JSON, FhirError, Issue, error, transient
from connectors.fhir.results_index import ResultsIndex
from connectors.fhir.results_view import RESULTS_VIEW, ResultsView
from connectors.fhir.routes import fhir_handler, fhir_response
from connectors.fhir.search import SEARCHABLE_TYPES, BadSearch, Query, parse_query, searchset
from connectors.http.state import SETTINGS, base_url
from radtriage import metrics

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5


def _refuse(resource_type: str, reason: str, exc: FhirError, detail: str = "") -> FhirError:
    metrics.count_fhir_read_refusal(resource_type, reason)
    log.info("FHIR %s read/search refused %d: %s%s", resource_type, exc.status, reason, detail)
    return exc


def _view(request: web.Request, resource_type: str) -> ResultsView:
    view = request.app.get(RESULTS_VIEW)
    if view is None:
        raise _refuse(
            resource_type,
            "disabled",
            error(404, "not-supported", "FHIR read and search are turned off here (fhir_search.enabled)"),
        )
    if not view.ready:
        done, total = view.loading_progress()
        raise _refuse(
            resource_type,
            "view_loading",
            transient(
                f"the results are still being loaded from the event log ({done} of at least {total} "
                "records read): retry shortly",
                RETRY_AFTER_S,
            ),
        )
    return view


def strict_handling(prefer: str) -> bool:
    """`Prefer: handling=strict` (RFC 7240 preferences, comma-separated)."""
    return any(p.strip().replace(" ", "").lower() == "handling=strict" for p in prefer.split(","))


@fhir_handler
async def read(request: web.Request) -> web.StreamResponse:
    resource_type = request.match_info["type"]
    resource_id = request.match_info["id"]
    view = _view(request, resource_type)
    stored = await asyncio.to_thread(view.locked, lambda index: index.get(resource_type, resource_id))
    if stored is None:
        raise _refuse(
            resource_type,
            "not_found",
            error(
                404,
                "not-found",
                f"{resource_type}/{resource_id[:64]} is not known here (never reported, or older "
                "than what this server keeps)",
            ),
        )
    headers = {
        "ETag": f'W/"{stored.version}"',
        "Last-Modified": format_datetime(stored.last_updated, usegmt=True),
    }
    return web.Response(
        status=200, body=stored.body, content_type=FHIR_JSON, charset="utf-8", headers=headers
    )


def _search(index: ResultsIndex, query: Query, base: str, ignored_note: str) -> dict[str, Any]:
    total, page = index.search(query)
    warnings = [ignored_note] if ignored_note else []
    if index.evicted_through is not None:
        warnings.append(
            f"resources last updated at or before {index.evicted_through.isoformat()} may no longer "
            "be kept here (fhir_search.max_resources) and are then not found"
        )
    return searchset(base, query, total, [s.resource for s in page], warnings)


@fhir_handler
async def search(request: web.Request) -> web.StreamResponse:
    resource_type = request.match_info["type"]
    view = _view(request, resource_type)
    settings = request.app[SETTINGS].fhir_search
    try:
        query = parse_query(
            resource_type,
            list(request.query.items()),
            strict=strict_handling(request.headers.get("Prefer", "")),
            default_count=settings.default_count,
            max_count=settings.max_count,
        )
    except BadSearch as exc:
        code = "not-supported" if exc.reason != "invalid_value" else "invalid"
        raise _refuse(
            resource_type,
            exc.reason,
            error(400, code, str(exc), exc.parameter[:64]),
            f" (parameter {exc.parameter[:40]!r})",
        ) from None
    note = f"search parameter(s) ignored: {', '.join(sorted(set(query.ignored)))}" if query.ignored else ""
    base = base_url(request)
    # Off the event loop: the lock may be held by the consumer applying a batch.
    bundle = await asyncio.to_thread(view.locked, lambda index: _search(index, query, base, note))
    return fhir_response(200, bundle)


@fhir_handler
async def not_allowed(request: web.Request) -> web.StreamResponse:
    resource_type = request.match_info["type"]
    raise FhirError(
        405,
        [Issue("not-supported", f"{resource_type} is read-only here: GET (read, search) only")],
        {"Allow": "GET, HEAD"},
    )


def add_routes(app: web.Application) -> None:
    """Before connectors/fhir/routes.py's: these paths would otherwise match its patterns."""
    for resource_type in SEARCHABLE_TYPES:
        app.router.add_get(f"/fhir/{{type:{resource_type}}}", search)
        app.router.add_route("*", f"/fhir/{{type:{resource_type}}}", not_allowed)
        app.router.add_get(f"/fhir/{{type:{resource_type}}}/{{id}}", read)
        app.router.add_route("*", f"/fhir/{{type:{resource_type}}}/{{id}}", not_allowed)
