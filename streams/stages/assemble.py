"""Assemble: `imaging.instances` -> `imaging.studies`.

Instances fold into a per-study table (`assembly`, changelogged) with the pure functions
of `streams/assembly.py`; a study is emitted when its sender releases the association
(the connector's `transfer_complete` marker) or when it has been quiet for
`streams.assembly_quiet_s` (a timer nudges it through its own partition, since table
writes must happen in the partition's stream). An emitted study's state is kept for an
hour: a late instance re-opens it and the next completion emits all of it. A release
marker that counts more instances than the state holds has them read back from the log
first (streams/assembly_reread.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import faust
from faust.types import EventT

from radtriage import metrics
from radtriage.telemetry import context_from_headers, headers_for_current_span
from schemas.base import EventDecodeError
from schemas.instances import InstanceEvent
from streams import assembly, assembly_reread
from streams.app import dead_letter, publish
from streams.stages.common import consumer_span, each
from streams.stages.context import PipelineContext


def traceparent_of(headers: Any) -> str:
    if not headers:
        return ""
    items = headers.items() if hasattr(headers, "items") else headers
    for k, v in items:
        if str(k).lower() == "traceparent":
            return v.decode() if isinstance(v, bytes | bytearray) else str(v)
    return ""


class Assemble:
    """The stage's steps; `register` wires them to the app. `nudged`: studies already nudged
    for the quiet period, with the last_instance_at they were nudged at."""

    def __init__(self, ctx: PipelineContext, table: Any) -> None:
        self.ctx, self.settings, self.topics = ctx, ctx.settings, ctx.topics
        self.table = table
        self.nudged: dict[str, str] = {}

    def state_of(self, study_uid: str) -> assembly.AssemblyState | None:
        raw = self.table.get(study_uid)
        return assembly.AssemblyState.model_validate(raw) if raw else None

    async def one(self, event: EventT[Any]) -> None:
        try:
            inst = InstanceEvent.from_bytes(event.value)
        except EventDecodeError as exc:
            await dead_letter(self.topics, event, "assemble", str(exc))
            return
        state = self.state_of(inst.study_uid)
        if inst.kind == "instance":
            new = assembly.add_instance(state, inst, traceparent_of(event.headers))
            self.table[inst.study_uid] = new.model_dump(mode="json")
            return
        if assembly.shortfall(state, inst) > 0:
            # Also for a study already emitted: a quiet-period nudge may have emitted it before
            # its release marker came (a sender stalled by a broker failover), short of what it
            # lost; the instances read back re-open it and it is emitted whole.
            state = await self.fill_from_log(event, inst, state)
        if state is not None and state.emitted_at is not None:
            if assembly.expired(state, datetime.now(UTC)):
                del self.table[inst.study_uid]  # no late instance is expected any more
                self.nudged.pop(inst.study_uid, None)
            # Already emitted (a duplicate marker, or a nudge that raced the release).
            return
        if state is None:
            return
        if inst.kind == "quiet_period" and not assembly.is_quiet(
            state, inst.received_at, self.settings.streams.assembly_quiet_s
        ):
            return  # instances came within the quiet period before the nudge was sent
        await self.emit(event, inst, state)

    async def fill_from_log(
        self, event: EventT[Any], marker: InstanceEvent, state: assembly.AssemblyState | None
    ) -> assembly.AssemblyState | None:
        message = event.message
        where = assembly_reread.log_range_for(
            marker,
            state,
            message.topic,
            message.partition,
            message.offset,
            self.settings.streams.assembly_reread_margin_s,
        )
        return await assembly_reread.fill_from_log(
            self.settings.kafka, self.settings.streams, where, marker, state
        )

    async def emit(self, event: EventT[Any], inst: InstanceEvent, state: assembly.AssemblyState) -> None:
        reason = "transfer_complete" if inst.kind == "transfer_complete" else "quiet_period"
        study_ctx = context_from_headers({"traceparent": state.traceparent}) if state.traceparent else None
        with consumer_span(
            self.ctx,
            "assemble",
            event,
            context=study_ctx,
            attrs={
                "radtriage.study_uid": inst.study_uid,
                "radtriage.ready_reason": reason,
                "radtriage.series_count": len(state.series),
            },
        ):
            # Ready at the completing event's own time (the sender's release, or the nudge),
            # not at processing time: a worker killed after publishing the study but before its
            # table update reached the changelog replays this event and emits the study again,
            # and the same ready time gives the same request ids, which the published ledgers
            # then recognise (a processing-time stamp made it new work: the cluster fault test
            # saw a doubled finding and report that way).
            key = assembly.completion_key(inst)
            study = assembly.complete_study(state, reason, now=inst.received_at, key=key)  # type: ignore[arg-type]
            await publish(self.topics.studies, study.study_uid, study, headers_for_current_span())
            metrics.observe_study_ready(study.ready_reason, study.received_at, study.ready_at)
        # Kept, marked emitted, to catch late instances (assembly.AssemblyState.emitted_at).
        self.table[inst.study_uid] = assembly.mark_emitted(state, study.ready_at, key).model_dump(mode="json")
        self.nudged.pop(inst.study_uid, None)

    async def scan(self) -> None:
        """Nudge studies that went quiet, and emitted ones past their retention."""
        now = datetime.now(UTC)
        metrics.STUDIES_ASSEMBLING.set(
            sum(1 for raw in self.table.values() if raw and not raw.get("emitted_at"))
        )
        for key, raw in list(self.table.items()):
            if not raw:
                continue
            state = assembly.AssemblyState.model_validate(raw)
            if assembly.expired(state, now):
                if self.nudged.get(state.study_uid) != "expired":
                    self.nudged[state.study_uid] = "expired"
                    await self.nudge(str(key), state.study_uid)
                continue
            if state.emitted_at is not None:
                continue
            stamp = state.last_instance_at.isoformat()
            if self.nudged.get(state.study_uid) != stamp and assembly.is_quiet(
                state, now, self.settings.streams.assembly_quiet_s
            ):
                self.nudged[state.study_uid] = stamp
                await self.nudge(str(key), state.study_uid)

    async def nudge(self, key: str, study_uid: str) -> None:
        # Through the study's own partition: table writes must happen in its stream.
        await publish(self.topics.instances, key, InstanceEvent(kind="quiet_period", study_uid=study_uid))


def register(ctx: PipelineContext) -> None:
    table = ctx.tables["assembly"] = ctx.app.Table("assembly", default=None)
    stage = Assemble(ctx, table)

    @ctx.app.agent(ctx.topics.instances, name="assemble")
    async def assemble(stream: faust.StreamT[Any]) -> None:
        await each(ctx, stream, "assemble", stage.one)

    @ctx.app.timer(interval=ctx.settings.streams.assembly_scan_interval_s)
    async def quiet_period_scan() -> None:
        await stage.scan()

    _ = (assemble, quiet_period_scan)
