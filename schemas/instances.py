"""`imaging.instances`: one event per stored DICOM instance, plus a transfer-complete marker.

Keyed by StudyInstanceUID, so the marker a connector sends when the sender releases
its association lands on the same partition *after* that study's instances.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from schemas.base import Event, utcnow


class InstanceEvent(Event):
    # "quiet_period" is the stream's own nudge (see streams/agents.py), never sent by a connector.
    kind: Literal["instance", "transfer_complete", "quiet_period"] = "instance"
    study_uid: str
    # For kind == "transfer_complete" the fields below describe the association, not one instance.
    series_uid: str = ""
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    study_description: str = ""
    accession_number: str = ""
    # The MRN is needed for the report's subject; names and birth dates never leave the connector.
    patient_id: str = ""
    blob_uri: str = ""
    # What series selection (streams/routing.py) and memory admission need to know of the
    # object, read from its header at intake (never pixel values). Defaults describe an
    # event from before these fields: an image of unknown shape.
    # False for an object without pixel data (a dose SR, a KOS, a PDF, a presentation
    # state): stored and kept with its study, never routed to a model.
    has_pixels: bool = True
    # ImageType values, upper case (e.g. ORIGINAL, PRIMARY, AXIAL; LOCALIZER for a scout).
    image_type: tuple[str, ...] = ()
    # ConvolutionKernel (CT reconstruction kernel, e.g. "STANDARD", "BONE", "Hr40f"),
    # multiple values joined with "\\".
    convolution_kernel: str = ""
    slice_thickness_mm: float | None = Field(default=None, ge=0.0)
    series_number: int | None = None
    instance_number: int | None = None
    rows: int = Field(default=0, ge=0)
    columns: int = Field(default=0, ge=0)
    # NumberOfFrames (1 for a single-frame image, 0 for an object without pixels).
    frames: int = Field(default=1, ge=0)
    bits_allocated: int = Field(default=0, ge=0)
    transfer_syntax_uid: str = ""
    source: Literal["dicom", "dicomweb"] = "dicom"
    calling_ae: str = ""
    association_id: str = ""
    # Number of instances of this study the association carried (transfer_complete only).
    instance_count: int = Field(default=0, ge=0)
    # When the association began storing this study (transfer_complete only): the assemble
    # stage re-reads the log from here when it lacks some of the instances counted above.
    association_started_at: datetime | None = None
    received_at: datetime = Field(default_factory=utcnow)
