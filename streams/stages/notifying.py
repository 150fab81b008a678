"""What the notify and notify-ops stages share: an HTTP session for their webhooks, the
background sends they track, and how they are wired to the app (partition events, the
agent on their topics, a timer, shutdown). Each stage's own logic stays in its module
(streams/stages/notify.py, streams/stages/notify_ops.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any

import aiohttp
import faust
from faust.types import EventT

from processors.notify import channels
from processors.notify.smtp_relay import SmtpRelay
from radtriage.settings import SmtpSettings
from streams.stages.common import each
from streams.stages.context import PipelineContext

log = logging.getLogger(__name__)


class Background:
    """Sends that run beside the stream (a slow peer must not hold the partition), the one
    aiohttp session they share and the kept connections to the mail relay."""

    what = "notify"  # names its failures in the log

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._relay: SmtpRelay | None = None

    def run_beside(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background work failed", self.what, exc_info=task.exception())

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def relay(self, smtp: SmtpSettings) -> SmtpRelay:
        if self._relay is None:
            self._relay = channels.smtp_relay(smtp)
        return self._relay

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._relay is not None:
            await self._relay.close()

    def close_soon(self) -> None:
        if (self._session is not None and not self._session.closed) or self._relay is not None:
            self.tasks.add(asyncio.ensure_future(self.close()))


class Notifying(Background):
    """A notifier stage's state: told of the partitions it owns, fed each record, woken by a
    timer. Both stages send under the notify settings, to its webhooks among others."""

    def __init__(self, ctx: PipelineContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.n = ctx.settings.notify
        self.webhooks = self.n.named_webhooks()

    def assigned(self, partitions: set[int]) -> None: ...
    def revoked(self) -> None: ...
    async def handle(self, event: EventT[Any]) -> None: ...
    async def tick(self) -> None: ...


def register_notifier(
    ctx: PipelineContext, notifier: Notifying, name: str, topics: Sequence[str], tick_s: float
) -> None:
    """`notifier` as the agent `name` on `topics` (raw bytes), told of its partitions of
    them, its `tick` run every `tick_s` (a failing tick is logged, the timer goes on), its
    session closed at shutdown."""
    source = ctx.app.topic(
        *topics, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )

    @ctx.app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(sender: Any, *args: Any, **kwargs: Any) -> None:
        notifier.revoked()

    @ctx.app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _assigned(sender: Any, assigned: Any = (), **kwargs: Any) -> None:
        notifier.assigned({tp.partition for tp in assigned if tp.topic in topics})

    async def _agent(stream: faust.StreamT[Any]) -> None:
        await each(ctx, stream, name, notifier.handle)

    ctx.app.agent(source, name=name)(_agent)

    async def _tick() -> None:
        try:
            await notifier.tick()
        except Exception:  # the timer must keep running
            log.exception("%s: tick failed", name)

    ctx.app.timer(interval=tick_s, name=f"{name}-tick")(_tick)

    @ctx.app.on_before_shutdown.connect  # type: ignore[arg-type]
    def _close(sender: Any, **kwargs: Any) -> None:
        notifier.close_soon()
