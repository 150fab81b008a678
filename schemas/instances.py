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
    source: Literal["dicom", "dicomweb"] = "dicom"
    calling_ae: str = ""
    association_id: str = ""
    # Number of instances of this study the association carried (transfer_complete only).
    instance_count: int = Field(default=0, ge=0)
    received_at: datetime = Field(default_factory=utcnow)
