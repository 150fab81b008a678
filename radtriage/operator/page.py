"""The operator page's routes on the HTTP server, and its live push.

  GET  /                          the page (server-rendered HTML)
  GET  /operator/events           Server-Sent Events: the page's sections on every change
  GET  /operator/studies/{uid}    one study's latency waterfall (HTML fragment)
  GET  /operator/api/state        the view in numbers and ids (JSON), for scripts and tests
  POST /operator/api/ack          {"alert_id", "by"} → alert_acknowledged on triage.audit
  POST /operator/api/replay       {"topic", "partition", "offset"} → the dead letter replayed once
  GET  /operator/static/...       operator.js, operator.css

The view lives in this process, fed by `Observer`; every open page gets the same
rendering, coalesced to at most one push per `operator.push_interval_s`. An
acknowledgement is answered OK only once Kafka has it (acks=all), and the page shows it
when the observer reads it back from `triage.audit` — the one source every page and a
restarted server agree on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from aiohttp import web

from connectors.http.body import read_limited
from connectors.http.events import PublishError
from connectors.http.middleware import HttpError
from connectors.http.state import PUBLISHER, SETTINGS
from radtriage.operator.actions import ActionError, ack_event, parse_ack, parse_replay, replay_letter
from radtriage.operator.observer import Observer
from radtriage.operator.render import e, page_html, sections, waterfall_html
from radtriage.operator.view import Fact, LedgerLoaded, Limits, View, fold, snapshot
from radtriage.operator.waterfall import read_tail_lines, span_groups, waterfall
from radtriage.replay import Coordinates, consumed_topics, parse_record, replay_record
from radtriage.settings import Settings
from radtriage.telemetry import headers_for_current_span
from schemas.base import utcnow

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
MAX_ACTION_BODY = 16 << 10


def _static_version() -> str:
    digest = hashlib.sha256()
    for path in sorted(STATIC_DIR.glob("*")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def load_ledger(settings: Settings) -> frozenset[Coordinates]:
    """The replay ledger's letters (read-only; a missing file is an empty ledger)."""
    try:
        text = replay_record(settings).read_text(encoding="utf-8")
    except OSError:
        return frozenset()
    return frozenset(c for c in (parse_record(line) for line in text.splitlines() if line.strip()) if c)


class OperatorPage:
    """The view, the reader feeding it, and the pages watching it."""

    def __init__(self, settings: Settings) -> None:
        op = settings.operator
        self.settings = settings
        self.limits = Limits(op.max_alerts, op.max_studies, op.max_finished, op.max_deadletters)
        self.view = View()
        self.consumed = consumed_topics(settings)
        self.static_version = _static_version()
        self.observer = Observer(settings, self.apply)
        self._changed = asyncio.Event()
        self._closing = False
        self._subscribers: set[asyncio.Queue[str | None]] = set()
        self._pusher: asyncio.Task[None] | None = None
        self._cache: tuple[int, str] | None = None

    def apply(self, facts: Sequence[Fact]) -> None:
        before = self.view.version
        for fact in facts:
            self.view = fold(self.view, fact, self.limits)
        if self.view.version != before:
            self._changed.set()

    def payload(self) -> str:
        """The sections as one SSE data line (JSON keeps it on one line)."""
        if self._cache is not None and self._cache[0] == self.view.version:
            return self._cache[1]
        snap = snapshot(self.view, utcnow(), self.consumed)
        text = json.dumps({"version": snap.version, "now": snap.now.isoformat(), "sections": sections(snap)})
        self._cache = (snap.version, text)
        return text

    async def start(self) -> None:
        self.apply([LedgerLoaded(await asyncio.to_thread(load_ledger, self.settings))])
        self.observer.start()
        self._pusher = asyncio.get_running_loop().create_task(self._push(), name="operator-push")

    def end_streams(self) -> None:
        """Let every open event stream finish (server shutdown: they never go idle alone)."""
        self._closing = True
        for queue in self._subscribers:
            queue.put_nowait(None)

    async def stop(self) -> None:
        self.end_streams()
        if self._pusher is not None:
            self._pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pusher
        await self.observer.stop()

    async def _push(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            text = self.payload()
            for queue in self._subscribers:
                # A slow page gets the newest picture, not a backlog of old ones.
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(text)
            await asyncio.sleep(self.settings.operator.push_interval_s)

    # -- handlers -----------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        snap = snapshot(self.view, utcnow(), self.consumed)
        return web.Response(
            text=page_html(snap, self.static_version),
            content_type="text/html",
            headers={"Cache-Control": "no-store"},
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # a reverse proxy must not buffer the stream
            }
        )
        await response.prepare(request)
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            # The browser reconnects by itself after this long if the stream drops.
            await response.write(b"retry: 2000\n\n")
            await response.write(f"event: snapshot\ndata: {self.payload()}\n\n".encode())
            while not self._closing:
                try:
                    item = await asyncio.wait_for(queue.get(), self.settings.operator.heartbeat_s)
                except TimeoutError:
                    await response.write(b": heartbeat\n\n")
                    continue
                if item is None:
                    break
                await response.write(f"event: snapshot\ndata: {item}\n\n".encode())
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        finally:
            self._subscribers.discard(queue)
        return response

    async def study(self, request: web.Request) -> web.Response:
        uid = request.match_info["study_uid"]
        track = self.view.studies.get(uid)
        if track is None:
            return web.Response(
                status=404,
                text=f'<p class="empty">Study {e(uid[:128])} is not in the page\'s lookback window.</p>',
                content_type="text/html",
            )
        op = self.settings.operator
        lines = await asyncio.to_thread(read_tail_lines, self.settings.trace_file, op.trace_scan_bytes)
        groups = await asyncio.to_thread(span_groups, lines, track.trace_ids, uid)
        return web.Response(text=waterfall_html(waterfall(track, groups)), content_type="text/html")

    async def state(self, request: web.Request) -> web.Response:
        snap = snapshot(self.view, utcnow(), self.consumed)
        return web.json_response(
            {
                "version": snap.version,
                "event_log": {"available": snap.status.available, "detail": snap.status.detail},
                "alerts": [
                    {
                        "alert_id": a.alert_id,
                        "acknowledged_by": ack.by if ack else None,
                        "notified": [
                            {
                                "recipient": t.recipient,
                                "channel": t.channel,
                                "step": t.step,
                                "at": t.at.isoformat(),
                            }
                            for t in snap.notified.get(a.alert_id, ())
                        ],
                        "overdue": a.alert_id in snap.overdue,
                    }
                    for a, ack in snap.alerts
                ],
                "worklist": {lane: [w.request_id for w in items] for lane, items in snap.lanes.items()},
                "finished": [f.request_id for f in snap.finished],
                "deadletters": [{"letter": str(lv.row.coords), "state": lv.state} for lv in snap.letters],
                "unreadable": dict(snap.unreadable),
            }
        )

    async def ack(self, request: web.Request) -> web.Response:
        with _refusal_as_http():
            wanted = parse_ack(await _json_body(request))
        alert = self.view.alerts.get(wanted.alert_id)
        if alert is None:
            raise HttpError(404, "no such alert on the page")
        existing = self.view.acks.get(wanted.alert_id)
        if existing is not None:
            raise HttpError(409, f"already acknowledged by {existing.by} at {existing.at.isoformat()}")
        at = utcnow()
        event = ack_event(alert, wanted.by, at)
        try:
            # Answered OK only once every in-sync replica has it (the server's acks=all publisher).
            meta = await request.app[PUBLISHER].publish(
                self.settings.topics.audit, alert.study_uid, event, dict(_header_pairs())
            )
        except PublishError:
            raise HttpError(
                503, "event log unavailable: not recorded, try again", {"Retry-After": "5"}
            ) from None
        log.info("alert %s acknowledged (audit %s:%s)", alert.alert_id, meta.partition, meta.offset)
        return web.json_response(
            {"status": "acknowledged", "alert_id": alert.alert_id, "by": wanted.by, "at": at.isoformat()}
        )

    async def replay(self, request: web.Request) -> web.Response:
        with _refusal_as_http():
            coords = parse_replay(await _json_body(request))
        row = self.view.letters.get(coords)
        if row is None:
            raise HttpError(404, "no such dead letter on the page")
        with _refusal_as_http():
            landed, ledger = await asyncio.to_thread(replay_letter, self.settings, row)
        self.apply([LedgerLoaded(ledger)])
        log.info("dead letter %s replayed to %s", coords, landed)
        return web.json_response({"status": "replayed", "letter": str(coords), "replayed_to": str(landed)})


def _header_pairs() -> list[tuple[str, str]]:
    return [(k, v.decode()) for k, v in headers_for_current_span()]


@contextlib.contextmanager
def _refusal_as_http() -> Iterator[None]:
    """An action's refusal (ActionError: a bad body, a letter that cannot be replayed, no
    Kafka) is the HTTP answer, with the action's own status and message."""
    try:
        yield
    except ActionError as exc:
        raise HttpError(exc.status, exc.message) from None


async def _json_body(request: web.Request) -> bytes:
    if request.content_type != "application/json":
        # Also what keeps another site's form from posting here: JSON needs a CORS preflight.
        raise HttpError(415, "send application/json")
    return await read_limited(request, MAX_ACTION_BODY)


OPERATOR = web.AppKey("operator", OperatorPage)


def add_routes(app: web.Application) -> None:
    """Mount the page (unless `operator.enabled` is off); its reader runs with the app."""
    settings = app[SETTINGS]
    if not settings.operator.enabled:
        return
    page = OperatorPage(settings)
    app[OPERATOR] = page
    app.router.add_get("/", page.index)
    app.router.add_get("/operator/events", page.events)
    app.router.add_get("/operator/studies/{study_uid}", page.study)
    app.router.add_get("/operator/api/state", page.state)
    app.router.add_post("/operator/api/ack", page.ack)
    app.router.add_post("/operator/api/replay", page.replay)
    app.router.add_static("/operator/static", STATIC_DIR)

    async def start(app: web.Application) -> None:
        await page.start()

    async def stop(app: web.Application) -> None:
        await page.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)


def end_streams(app: web.Application) -> None:
    """Before a graceful stop waits for requests in flight: end the open event streams."""
    page = app.get(OPERATOR)
    if page is not None:
        page.end_streams()
