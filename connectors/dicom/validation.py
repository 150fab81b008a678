"""What the DICOM listener accepts, and the C-STORE status it answers otherwise (pure).

Status codes (PS3.4 Annex B.2.3): 0xA7xx Refused: Out of Resources (the sender
retries later), 0xA9xx Error: Data Set Does Not Match SOP Class, 0xCxxx Error:
Cannot Understand. The reason goes back to the sender in ErrorComment.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from connectors.blobstore import valid_uid
from schemas.instances import InstanceEvent

SUCCESS = 0x0000
OUT_OF_RESOURCES_KAFKA = 0xA700
OUT_OF_RESOURCES_STORAGE = 0xA701
NOT_AN_IMAGE = 0xA900
CANNOT_DECODE = 0xC210
MISSING_IDENTITY = 0xC220

# ErrorComment is an LO: at most 64 characters.
MAX_COMMENT = 64


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str

    @property
    def comment(self) -> str:
        return self.reason[:MAX_COMMENT]


def check_instance(ds: Dataset) -> Refusal | None:
    """None if radtriage can take this instance; otherwise why not."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(keyword, "") or "")
        if not value:
            return Refusal(MISSING_IDENTITY, f"missing {keyword}")
        if not valid_uid(value):
            return Refusal(MISSING_IDENTITY, f"invalid {keyword}")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return Refusal(NOT_AN_IMAGE, "no pixel data: radtriage triages images only")
    if not ds.get("Rows") or not ds.get("Columns"):
        return Refusal(NOT_AN_IMAGE, "image without Rows/Columns")
    if not str(ds.get("Modality", "") or ""):
        return Refusal(MISSING_IDENTITY, "missing Modality")
    return None


def instance_event(ds: Dataset, *, blob_uri: str, calling_ae: str, association_id: str) -> InstanceEvent:
    """The routing metadata of an accepted instance. Never names or birth dates."""

    def text(keyword: str) -> str:
        return str(ds.get(keyword, "") or "").strip()

    return InstanceEvent(
        kind="instance",
        study_uid=text("StudyInstanceUID"),
        series_uid=text("SeriesInstanceUID"),
        sop_instance_uid=text("SOPInstanceUID"),
        sop_class_uid=text("SOPClassUID"),
        modality=text("Modality").upper(),
        body_part=text("BodyPartExamined").upper(),
        series_description=text("SeriesDescription"),
        study_description=text("StudyDescription"),
        accession_number=text("AccessionNumber"),
        patient_id=text("PatientID"),
        blob_uri=blob_uri,
        source="dicom",
        calling_ae=calling_ae,
        association_id=association_id,
    )
