"""What the DICOM listener accepts, and the C-STORE status it answers otherwise (pure).

Status codes (PS3.4 Annex B.2.3, PS3.7 9.1.1.1.9 and Annex C):

| code   | meaning (standard)                       | radtriage uses it for                                  |
|--------|------------------------------------------|--------------------------------------------------------|
| 0xA700 | Refused: Out of Resources                | Kafka did not acknowledge the event in time            |
| 0xA701 | Refused: Out of Resources                | the blob store could not write the instance            |
| 0x0122 | Refused: SOP Class Not Supported         | a SOP class radtriage does not triage (SR, PDF, PR...) |
| 0xA900 | Error: Data Set Does Not Match SOP Class | an image without pixel data/Rows/Columns/Modality, or  |
|        |                                          | a dataset whose SOP class/instance differs from the    |
|        |                                          | C-STORE request                                        |
| 0xC210 | Error: Cannot Understand                 | the byte stream does not decode (pynetdicom's own code |
|        |                                          | for "failed to decode the dataset")                    |
| 0xC220 | Error: Cannot Understand                 | Study/Series/SOP Instance/SOP Class UID missing or not |
|        |                                          | a DICOM UID: the object cannot be filed or keyed       |

Out of Resources is the only family a sender is expected to retry; every other
failure is permanent for that object. The reason goes back in ErrorComment (an LO:
at most 64 characters) and never contains a value from the dataset, so no PHI can
leak through a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import uid as uids
from pydicom.dataset import Dataset
from pydicom.uid import UID

from connectors.blobstore import valid_uid
from schemas.instances import InstanceEvent

SUCCESS = 0x0000
OUT_OF_RESOURCES_KAFKA = 0xA700
OUT_OF_RESOURCES_STORAGE = 0xA701
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AN_IMAGE = 0xA900
DATASET_MISMATCH = 0xA900
CANNOT_DECODE = 0xC210
MISSING_IDENTITY = 0xC220

# ErrorComment is an LO: at most 64 characters.
MAX_COMMENT = 64

# The image objects radtriage triages: CT, MR, CR, DX and MG, classic and enhanced.
# Everything else (structured reports, encapsulated documents, presentation states,
# other modalities) is refused with 0x0122 and a reason, rather than stored and then
# reported as unroutable.
TRIAGED_SOP_CLASSES: frozenset[str] = frozenset(
    {
        uids.CTImageStorage,
        uids.EnhancedCTImageStorage,
        uids.LegacyConvertedEnhancedCTImageStorage,
        uids.MRImageStorage,
        uids.EnhancedMRImageStorage,
        uids.EnhancedMRColorImageStorage,
        uids.LegacyConvertedEnhancedMRImageStorage,
        uids.ComputedRadiographyImageStorage,
        uids.DigitalXRayImageStorageForPresentation,
        uids.DigitalXRayImageStorageForProcessing,
        uids.DigitalMammographyXRayImageStorageForPresentation,
        uids.DigitalMammographyXRayImageStorageForProcessing,
        uids.BreastTomosynthesisImageStorage,
    }
)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_IDENTITY = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


@dataclass(frozen=True)
class Refusal:
    """A C-STORE failure status and why; `reason` is safe to log (no dataset values)."""

    status: int
    reason: str

    @property
    def comment(self) -> str:
        """The reason as an ErrorComment (LO, <= 64 characters)."""
        return self.reason[:MAX_COMMENT]


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def sop_class_name(sop_class_uid: str) -> str:
    """A readable SOP class name for reasons and logs ('1.2.3' if pydicom does not know it)."""
    name = UID(sop_class_uid).name if valid_uid(sop_class_uid) else ""
    return name or sop_class_uid or "unknown SOP class"


def undecodable(exc: BaseException) -> Refusal:
    """The refusal for a byte stream pydicom cannot decode. Only the exception's type is
    kept: its message may quote bytes of the dataset."""
    return Refusal(CANNOT_DECODE, f"dataset cannot be decoded ({type(exc).__name__})")


def fully_decode(ds: Dataset) -> Refusal | None:
    """Convert every element, sequences included, so a corrupt dataset fails here.

    pynetdicom and pydicom defer value conversion until an element is first read; a
    bad element that validation happens not to touch would otherwise be stored, acked
    and only fail in the inference worker.
    """
    try:
        for _ in ds.iterall():
            pass
    except Exception as exc:  # pydicom raises many types on a corrupt byte stream
        return undecodable(exc)
    return None


def check_instance(
    ds: Dataset, *, request_sop_class: str | None = None, request_sop_instance: str | None = None
) -> Refusal | None:
    """None if radtriage can take this instance; otherwise the status and why not.

    `request_sop_class`/`request_sop_instance` are the C-STORE request's Affected SOP
    Class/Instance UIDs: the stored Part 10 file's meta header is built from them, so a
    dataset that disagrees would be filed inconsistently.
    """
    sop_class = _text(ds, "SOPClassUID")
    if not sop_class or not valid_uid(sop_class):
        return Refusal(MISSING_IDENTITY, f"{'invalid' if sop_class else 'missing'} SOPClassUID")
    if request_sop_class is not None and sop_class != request_sop_class:
        return Refusal(DATASET_MISMATCH, "SOPClassUID differs from the C-STORE request")
    if sop_class not in TRIAGED_SOP_CLASSES:
        return Refusal(
            SOP_CLASS_NOT_SUPPORTED,
            f"{sop_class_name(sop_class)} not supported: CT/MR/CR/DX/MG images only",
        )
    for keyword in _IDENTITY:
        value = _text(ds, keyword)
        if not value:
            return Refusal(MISSING_IDENTITY, f"missing {keyword}")
        if not valid_uid(value):
            return Refusal(MISSING_IDENTITY, f"invalid {keyword}")
    if request_sop_instance is not None and _text(ds, "SOPInstanceUID") != request_sop_instance:
        return Refusal(DATASET_MISMATCH, "SOPInstanceUID differs from the C-STORE request")
    # Type 1 attributes of every image IOD we take: without them the object is not the
    # image its SOP class promises, and the router/loader could not use it.
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        return Refusal(NOT_AN_IMAGE, "no pixel data in an image SOP class")
    if not ds.get("Rows") or not ds.get("Columns"):
        return Refusal(NOT_AN_IMAGE, "image without Rows/Columns")
    if not _text(ds, "Modality"):
        return Refusal(NOT_AN_IMAGE, "image without Modality")
    return None


def instance_event(ds: Dataset, *, blob_uri: str, calling_ae: str, association_id: str) -> InstanceEvent:
    """The routing metadata of an accepted instance. Never names or birth dates: only the
    identifiers and descriptions the router needs, and the MRN for the report's subject."""
    return InstanceEvent(
        kind="instance",
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        modality=_text(ds, "Modality").upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        series_description=_text(ds, "SeriesDescription"),
        study_description=_text(ds, "StudyDescription"),
        accession_number=_text(ds, "AccessionNumber"),
        patient_id=_text(ds, "PatientID"),
        blob_uri=blob_uri,
        source="dicom",
        calling_ae=calling_ae,
        association_id=association_id,
    )
