"""`triage.requests.{stat,urgent,routine}`: one model run asked for one series of a study."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from models import registry
from radtriage.settings import Lane
from schemas.base import Event, utcnow
from schemas.orders import OrderEvent, PatientClass

__all__ = ["FindingCode", "Lane", "Laterality", "OrderRef", "TriageRequest"]


def _known_finding(code: str) -> str:
    if code not in registry.finding_codes():
        known = ", ".join(sorted(registry.finding_codes()))
        raise ValueError(f"finding {code!r} is no registered model's (known: {known})")
    return code


# The finding code of a registered model (models/registry.py): one per model, from its spec.
FindingCode = Annotated[str, AfterValidator(_known_finding)]
# The patient's side of a finding (DICOM patient coordinates: +x is the patient's left).
# "none": the model reports sides but states none, because it found nothing above its
# threshold; a finding of a model without a side output has no laterality at all (None).
Laterality = Literal["left", "right", "none"]


class OrderRef(BaseModel):
    """What a result needs of the study's order to be filed against it by an EHR or RIS
    (DiagnosticReport.basedOn, the ORU's ORC/OBR and PID-3): the order numbers and who
    assigned the patient id. Ids only, never names (schemas/orders.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    placer_order_number: str = ""
    filler_order_number: str = ""
    patient_id_system: str = ""
    patient_id_authority: str = ""

    @classmethod
    def of(cls, order: OrderEvent) -> OrderRef:
        return cls(
            placer_order_number=order.placer_order_number,
            filler_order_number=order.filler_order_number,
            patient_id_system=order.patient_id_system,
            patient_id_authority=order.patient_id_authority,
        )


class TriageRequest(Event):
    study_uid: str
    accession_number: str = ""
    patient_id: str = ""
    series_uid: str
    # The chosen series as a viewer names it (the report says which series was read).
    series_number: int | None = None
    series_description: str = ""
    instance_uris: tuple[str, ...]
    # Decoded pixel bytes of the series (schemas/studies.SeriesRef.pixel_bytes): what the
    # preprocessing pool admits work by (0: unknown, admitted as one series' worth).
    pixel_bytes: int = Field(default=0, ge=0)
    lane: Lane
    rule_id: str
    model_name: str
    # The rule's model_version (schemas/routing_rules.py); "": the version Triton serves.
    model_version: str = Field(default="", pattern=r"^([1-9][0-9]*)?$")
    finding: FindingCode
    threshold: float = Field(ge=0.0, le=1.0)
    # The rule's localisation_threshold (schemas/routing_rules.py); None: the reference value.
    localisation_threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    received_at: datetime
    ready_at: datetime
    routed_at: datetime = Field(default_factory=utcnow)
    # One routing decision's identity (study/rule/ready time): a copy re-queued on a faster
    # lane by a late order keeps it, so the lanes run the work once between them.
    request_id: str = ""
    # Why this lane (streams/priority.py), and the lane it was upgraded from, if it was.
    lane_reason: str = ""
    upgraded_from: Lane | None = None
    # A later series the rule prefers replaced the one an earlier request of this study
    # and rule used (streams/routing.py): that request's id. Its finding is amended (the
    # same report id, status "amended"), never alerted twice.
    amends_request_id: str = ""
    # Optional (schema_version unchanged): the order known when the study was routed (or
    # when a late order moved it up); None when no order had arrived by then.
    order: OrderRef | None = None
    # Where the patient is, as the join knew it when routing (ADT or the order's patient
    # class); carried to the finding and the alert, for the notify stage's on-call rules.
    patient_class: PatientClass = "unknown"
