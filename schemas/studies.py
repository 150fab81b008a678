"""`imaging.studies`: a study whose instances have all arrived, ready for routing."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.base import Event, utcnow


class SeriesHeaders(BaseModel):
    """Series-level header facts for series selection (streams/routing.py) and memory
    admission (processors/preprocess_pool.py), from the series' instances
    (schemas/instances.py); the defaults describe an event from before they existed."""

    model_config = ConfigDict(extra="forbid")

    modality: str
    body_part: str = ""
    series_description: str = ""
    series_number: int | None = None
    has_pixels: bool = True
    image_type: tuple[str, ...] = ()
    convolution_kernel: str = ""
    slice_thickness_mm: float | None = None
    rows: int = 0
    columns: int = 0
    # Frames in the whole series (the sum over its instances; enhanced CT/MR: many per instance).
    frames: int = 0
    bits_allocated: int = 0


class SeriesRef(SeriesHeaders):
    model_config = ConfigDict(extra="forbid", frozen=True)

    series_uid: str
    instance_uris: tuple[str, ...]

    @property
    def pixel_bytes(self) -> int:
        """The series' decoded pixel data (what loading it costs before any reduction)."""
        frames = self.frames or len(self.instance_uris)
        return frames * self.rows * self.columns * max(self.bits_allocated, 16) // 8


class StudyEvent(Event):
    study_uid: str
    accession_number: str = ""
    patient_id: str = ""
    study_description: str = ""
    series: tuple[SeriesRef, ...]
    # First instance received: the start of the end-to-end latency clock.
    received_at: datetime
    ready_at: datetime = Field(default_factory=utcnow)
    ready_reason: Literal["transfer_complete", "quiet_period"]
