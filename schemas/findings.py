"""`triage.findings`: what a model said about one series."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.base import Event, utcnow
from schemas.orders import PatientClass
from schemas.requests import FindingCode, Lane, Laterality, OrderRef


class SliceRange(BaseModel):
    """Where in the series a model places its finding, coarsely: the first and last slice
    of the original series that its localisation map marks (processors/localisation.py).

    "First" is the slice lowest along the slice normal (for an axial head CT of a patient
    lying head first: the most inferior), "last" the highest; every slice between them is
    inside the range, whatever their InstanceNumbers (senders number slices in any order).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # InstanceNumber of the first and last slice; None when the series does not carry them.
    first_instance_number: int | None
    last_instance_number: int | None
    # Their positions along the slice normal in mm (for an axial series: the patient z in
    # DICOM patient coordinates, the ImagePositionPatient z a viewer shows).
    first_position_mm: float
    last_position_mm: float
    # Slices of the series from first to last, both included.
    slices: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered_and_complete(self) -> Self:
        if self.first_position_mm > self.last_position_mm:
            raise ValueError(
                f"first_position_mm {self.first_position_mm} is above "
                f"last_position_mm {self.last_position_mm}"
            )
        if (self.first_instance_number is None) != (self.last_instance_number is None):
            raise ValueError("first and last instance numbers are given together or not at all")
        return self


# BI-RADS assessment categories (ACR BI-RADS Atlas, 5th edition): 0 incomplete (needs
# additional imaging), 1 negative, 2 benign, 3 probably benign, 4 suspicious, 5 highly
# suggestive of malignancy, 6 known biopsy-proven malignancy (clinical knowledge: never
# suggested by an image model, but a valid category for a consumer to receive).
BiradsCategory = Literal[0, 1, 2, 3, 4, 5, 6]
SUSPICIOUS_CATEGORIES: tuple[int, ...] = (4, 5)


class BiradsAssessment(BaseModel):
    """A mammography model's suggested BI-RADS category (processors/birads.py): the
    study's overall category, the most concerning of its views by the ACR hierarchy, and
    each breast's own. A suggestion for a radiologist, never a final assessment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    category: BiradsCategory
    # The model's probability of that category, on the view that sets it.
    probability: float = Field(ge=0.0, le=1.0)
    # The breast whose finding sets the overall category; None when no breast has one
    # (category 1) or the category is not a finding of one breast.
    side: Literal["left", "right"] | None = None
    # Each breast's category; None when the series holds no CC or MLO view of that breast.
    left_category: BiradsCategory | None = None
    right_category: BiradsCategory | None = None
    # The views (RCC, RMLO, LCC, LMLO) the overall category was read on.
    views: tuple[str, ...] = ()


class LungNodule(BaseModel):
    """One nodule a lung-nodule model found (processors/nodules.py): where it is in the
    patient, how big, how sure. A candidate for a radiologist, never a diagnosis."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The probability-weighted centre in DICOM patient coordinates (LPS: +x the patient's
    # left, +y posterior, +z head), mm: what a viewer's crosshair shows.
    centre_lps_mm: tuple[float, float, float]
    # The diameter of the sphere with the nodule's volume on the map, mm (the Lung-RADS
    # and Fleischner size categories are read on it).
    diameter_mm: float = Field(gt=0.0, le=300.0)
    # The map's peak probability on the nodule.
    probability: float = Field(ge=0.0, le=1.0)
    # Which lung: the side of the patient's midline (x = 0 mm) the centre is on.
    lung: Literal["left", "right"]


class Finding(Event):
    study_uid: str
    accession_number: str = ""
    patient_id: str = ""
    series_uid: str
    finding: FindingCode
    probability: float = Field(ge=0.0, le=1.0)
    threshold: float = Field(ge=0.0, le=1.0)
    positive: bool
    model_name: str
    model_version: str
    lane: Lane
    rule_id: str
    received_at: datetime
    ready_at: datetime
    inferred_at: datetime = Field(default_factory=utcnow)
    inference_ms: float = Field(ge=0.0)
    # The request this answers (TriageRequest.request_id): the identity the findings and
    # reports ledgers deduplicate on (streams/published_ledger.py). Optional: older
    # findings have none.
    request_id: str = ""
    # Optional (schema_version unchanged: a reader of these fields' absence gets None, as
    # for the other optional fields added since v1). Models with a side output (the LVO
    # detector) state the side of a positive finding and how sure they are of it.
    laterality: Laterality | None = None
    # P(the stated side is the affected one); set exactly when laterality is left/right.
    laterality_probability: float | None = Field(default=None, ge=0.0, le=1.0)
    # Optional too: models with a localisation map (the ICH classifier's blood map) say
    # which slices of the series a positive finding is on; None for negative findings and
    # for models or series without one.
    slice_range: SliceRange | None = None
    # Optional too: where the localisation map behind slice_range is kept (a blob store
    # `file://` URI, processors/localisation_map.py), for the DICOM SEG; None for findings
    # without one (negative, no map, a map that could not be stored, older findings).
    localisation_map_uri: str | None = None
    # Optional too: a mammography model's suggested BI-RADS category. A suspicious
    # category (4, 5) is exactly a positive finding.
    birads: BiradsAssessment | None = None
    # Optional too: a lung-nodule model's nodules, likeliest first (at most
    # processors.nodules.MAX_NODULES). Non-empty exactly for a positive finding: the
    # study's probability is the map's peak, so a positive study has a nodule.
    nodules: tuple[LungNodule, ...] | None = None
    # Optional too: the series the model read, as a viewer names it (the report says so).
    series_number: int | None = None
    series_description: str = ""
    # Optional too: the request whose finding this one replaces (a better series arrived
    # after the study was first read; TriageRequest.amends_request_id). The report goes out
    # again under the same id with status "amended"; an alert already sent is not repeated.
    amends_request_id: str = ""
    # Optional too: the study's order as its request knew it (TriageRequest.order), so the
    # report can point to it and name the patient with an assigning authority.
    order: OrderRef | None = None
    # The request's (TriageRequest.patient_class).
    patient_class: PatientClass = "unknown"

    @model_validator(mode="after")
    def _nodules_agree_with_positive(self) -> Self:
        if self.nodules is not None and bool(self.nodules) != self.positive:
            raise ValueError(
                f"{len(self.nodules)} nodule(s) contradict positive={self.positive} "
                "(a positive nodule finding lists its nodules, a negative one none)"
            )
        return self

    @model_validator(mode="after")
    def _birads_agrees_with_positive(self) -> Self:
        if self.birads is not None and (self.birads.category in SUSPICIOUS_CATEGORIES) != self.positive:
            raise ValueError(
                f"BI-RADS category {self.birads.category} contradicts positive={self.positive} "
                f"(categories {SUSPICIOUS_CATEGORIES} are exactly the positive findings)"
            )
        return self

    @model_validator(mode="after")
    def _side_and_its_probability_together(self) -> Self:
        sided = self.laterality in ("left", "right")
        if sided != (self.laterality_probability is not None):
            raise ValueError(
                "laterality_probability is given exactly when laterality is left or right "
                f"(laterality={self.laterality!r}, laterality_probability={self.laterality_probability!r})"
            )
        return self
