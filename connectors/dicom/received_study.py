"""One study's share of one transfer: a C-STORE association or a STOW-RS request.

Both intake paths keep the same per-study state while a transfer runs (the study's
receive span, how many of its instances were stored, when the transfer began) and end
it the same way: a `transfer_complete` marker carrying the count and the start time
(the assembly checks the count against what it has, and reads back from the log what
it lacks: ARCHITECTURE.md, "Study assembly"), then the span closed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from schemas.base import utcnow
from schemas.instances import InstanceEvent

tracer = trace.get_tracer(__name__)


@dataclass
class ReceivedStudy:
    span: Span
    context: Context
    count: int = 0
    # Taken before its first instance is published: the marker's association_started_at,
    # from which the assembly finds where to read the partition back.
    started_at: datetime = field(default_factory=utcnow)

    @classmethod
    def start(
        cls, name: str, attributes: dict[str, str], kind: SpanKind = SpanKind.INTERNAL
    ) -> ReceivedStudy:
        span = tracer.start_span(name, kind=kind, attributes=attributes)
        return cls(span=span, context=trace.set_span_in_context(span))

    def traceparent(self) -> dict[str, str]:
        """The W3C trace context headers every event of this study carries."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=self.context)
        return carrier

    def marker(
        self,
        study_uid: str,
        association_id: str,
        source: Literal["dicom", "dicomweb"],
        calling_ae: str = "",
    ) -> InstanceEvent:
        """The end-of-transfer marker: this transfer stored `count` instances of the study."""
        return InstanceEvent(
            kind="transfer_complete",
            study_uid=study_uid,
            instance_count=self.count,
            association_started_at=self.started_at,
            association_id=association_id,
            calling_ae=calling_ae,
            source=source,
        )

    def end(self, error: str = "", **attributes: str | int) -> None:
        """Close the span, with the instance count, the attributes given and any error."""
        self.span.set_attribute("dicom.instances", self.count)
        for key, value in attributes.items():
            self.span.set_attribute(key, value)
        if error:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()
