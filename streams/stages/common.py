"""The loop, span and audit every stage shares, written once.

- `each`: an agent's `async for`; a message that fails is dead-lettered with the stage
  and the cause, and the partition moves on (one bad message never stops a stream);
- `consumer_span`: the CONSUMER span of one record, continuing the trace its headers carry;
- `audit`: one decision on `triage.audit`, in the current span's trace.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import faust
from faust.types import EventT
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind

from radtriage.telemetry import consumer_attributes, context_from_headers, headers_for_current_span
from schemas.audit import AuditEvent, AuditStage
from streams.app import dead_letter, publish
from streams.stages.context import PipelineContext

log = logging.getLogger("streams.agents")
tracer = trace.get_tracer("radtriage.streams")

Scalar = str | float | int | bool
Detail = dict[str, Scalar]


def span_attrs(**attrs: Any) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if v not in (None, "")}


def consumed(event: EventT[Any], group: str, **attrs: Any) -> dict[str, Any]:
    """A CONSUMER span's attributes: where the record came from (messaging conventions) + ours."""
    message = event.message
    return consumer_attributes(message.topic, message.partition, message.offset, group) | span_attrs(**attrs)


@contextlib.contextmanager
def consumer_span(
    ctx: PipelineContext,
    name: str,
    event: EventT[Any],
    *,
    context: Context | None = None,
    attrs: Mapping[str, Any],
) -> Iterator[Span]:
    """The stage's span for one record, in the trace the record's headers carry (or `context`)."""
    with tracer.start_as_current_span(
        name,
        context=context if context is not None else context_from_headers(event.headers),
        kind=SpanKind.CONSUMER,
        attributes=consumed(event, ctx.group, **attrs),
    ) as span:
        yield span


async def each(
    ctx: PipelineContext,
    stream: faust.StreamT[Any],
    stage: str,
    handle: Callable[[EventT[Any]], Awaitable[None]],
    guard: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> None:
    """Feed every record of `stream` to `handle`; a failure dead-letters the record as `stage`."""
    async for event in stream.events():
        try:
            with guard():
                await handle(event)
        except Exception as exc:  # the partition must keep moving
            log.exception("%s failed", stage)
            await dead_letter(ctx.topics, event, stage, f"{type(exc).__name__}: {exc}")


async def audit(
    ctx: PipelineContext,
    study_uid: str,
    accession: str,
    stage: AuditStage,
    decision: str,
    detail: Mapping[str, Scalar],
) -> None:
    await publish(
        ctx.topics.audit,
        study_uid,
        AuditEvent(
            study_uid=study_uid,
            accession_number=accession,
            stage=stage,
            decision=decision,
            detail=dict(detail),
        ),
        headers_for_current_span(),
    )
