"""What the DICOM listener accepts, and the C-STORE status it answers otherwise (pure).

Every storage SOP class is taken: a study arrives with more than its images (a dose
SR, a key object selection, secondary captures, presentation states, PDFs, raw data),
and a sender whose SR is refused stops sending the rest of the study. Such an object is
stored and published like an image, with `has_pixels=False` when it carries no pixel
data, and the router leaves it alone. Refusals remain for what is really broken:

| code   | meaning (standard)                       | radtriage uses it for                                  |
|--------|------------------------------------------|--------------------------------------------------------|
| 0xA700 | Refused: Out of Resources                | Kafka did not acknowledge the event in time            |
| 0xA701 | Refused: Out of Resources                | the blob store could not write the instance            |
| 0xA900 | Error: Data Set Does Not Match SOP Class | an image SOP class without pixel data/Rows/Columns/    |
|        |                                          | Modality, or a dataset whose SOP class/instance        |
|        |                                          | differs from the C-STORE request                       |
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

from radtriage.blobstore import valid_uid
from schemas.instances import InstanceEvent

SUCCESS = 0x0000
OUT_OF_RESOURCES_KAFKA = 0xA700
OUT_OF_RESOURCES_STORAGE = 0xA701
# No longer answered by the listener (every storage SOP class is taken); kept because
# the STOW-RS response codes and older tests name it.
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AN_IMAGE = 0xA900
DATASET_MISMATCH = 0xA900
CANNOT_DECODE = 0xC210
MISSING_IDENTITY = 0xC220

# ErrorComment is an LO: at most 64 characters.
MAX_COMMENT = 64

# The image objects radtriage's models triage: CT, MR, CR, DX and MG, classic and
# enhanced. Not an acceptance list (every storage SOP class is stored): the writers'
# tests use it to check they produce what the router reads.
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

# Every transfer syntax the C-STORE listener negotiates, for every storage SOP class;
# instances are stored as received (never transcoded), so the file's meta header keeps
# the negotiated syntax and the pixel loader decodes it (pydicom + pylibjpeg plug-ins).
# The order is a preference: pynetdicom's acceptor takes, per presentation context, the
# first syntax of *this* list the proposer also offered. Uncompressed first (a sender
# that has the object uncompressed sends it as it is, and it is the cheapest to load),
# then lossless compression, lossy last: a sender offering several for one object is
# never asked to compress it lossily. A sender proposing only its file's own syntax (as
# dcmtk's storescu does for a compressed file) gets exactly that.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    # Explicit before implicit: what senders' files usually are, and it keeps every VR.
    uids.ExplicitVRLittleEndian,
    uids.ImplicitVRLittleEndian,
    uids.DeflatedExplicitVRLittleEndian,
    uids.ExplicitVRBigEndian,
    uids.RLELossless,  # 1.2.840.10008.1.2.5
    uids.JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70
    uids.JPEGLossless,  # .57 (process 14)
    uids.JPEGLSLossless,  # .80
    uids.JPEG2000Lossless,  # .90
    uids.HTJ2KLossless,  # .201
    uids.HTJ2KLosslessRPCL,  # .202
    uids.JPEGLSNearLossless,  # .81
    uids.JPEG2000,  # .91
    uids.HTJ2K,  # .203
    uids.JPEGExtended12Bit,  # .51
    uids.JPEGBaseline8Bit,  # .50
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


def is_image_class(sop_class_uid: str) -> bool:
    """An image SOP class: its IOD makes pixel data, Rows and Columns Type 1.

    By name ("... Image Storage", pydicom's UID dictionary): the image IODs are named so
    (CT, MR, CR, DX, MG, US, NM, secondary capture, enhanced and legacy-converted,
    ophthalmic, video, WSI...), the others are not (SR, KOS, PR, encapsulated documents,
    raw data, waveforms, segmentations, RT objects), and a few of those may still carry
    pixels (a segmentation, a parametric map): `has_pixels` says so per instance.
    """
    return sop_class_uid in TRIAGED_SOP_CLASSES or "Image Storage" in UID(sop_class_uid).name


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
    for keyword in _IDENTITY:
        value = _text(ds, keyword)
        if not value:
            return Refusal(MISSING_IDENTITY, f"missing {keyword}")
        if not valid_uid(value):
            return Refusal(MISSING_IDENTITY, f"invalid {keyword}")
    if request_sop_instance is not None and _text(ds, "SOPInstanceUID") != request_sop_instance:
        return Refusal(DATASET_MISMATCH, "SOPInstanceUID differs from the C-STORE request")
    if not is_image_class(sop_class):
        # Any other storage object (SR, KOS, PDF, presentation state, raw data...) is
        # stored as it is: its study is complete only with it, and a sender refused here
        # stops the rest of the study.
        return None
    # Type 1 attributes of every image IOD: without them the object is not the image its
    # SOP class promises, and the router/loader could not use it.
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        return Refusal(NOT_AN_IMAGE, "no pixel data in an image SOP class")
    if not ds.get("Rows") or not ds.get("Columns"):
        return Refusal(NOT_AN_IMAGE, "image without Rows/Columns")
    if not _text(ds, "Modality"):
        return Refusal(NOT_AN_IMAGE, "image without Modality")
    return None


def _number(ds: Dataset, keyword: str, kind: type[int] | type[float]) -> int | float | None:
    """An IS/DS/US header value as a number, or None when absent or malformed: a bad
    optional value must not refuse an otherwise good instance (IS/DS values are text,
    and senders do write "", "  ", or "5.0" into an IS)."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        if not isinstance(value, (int, float, str, bytes)):
            value = value[0]  # a multi-valued element: its first value
        number = kind(float(value)) if kind is int else float(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return number


def _count(ds: Dataset, keyword: str) -> int:
    number = _number(ds, keyword, int)
    return int(number) if number is not None and number >= 0 else 0


def _texts(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    values = [value] if isinstance(value, (str, bytes)) else list(value)
    return tuple(str(x).strip() for x in values if str(x).strip())


def has_pixels(ds: Dataset) -> bool:
    return any(keyword in ds for keyword in _PIXEL_KEYWORDS)


def instance_event(
    ds: Dataset, *, blob_uri: str, calling_ae: str, association_id: str, transfer_syntax: str = ""
) -> InstanceEvent:
    """The routing metadata of an accepted instance. Never names or birth dates: only the
    identifiers and descriptions the router needs, the MRN for the report's subject, and
    the header facts series selection and memory admission use (never pixel values).

    `transfer_syntax`: the syntax the instance was received in (the negotiated one for a
    C-STORE); by default the dataset's own file meta header says it.
    """
    pixels = has_pixels(ds)
    frames = max(_count(ds, "NumberOfFrames"), 1) if pixels else 0
    thickness = _number(ds, "SliceThickness", float)
    series_number = _number(ds, "SeriesNumber", int)
    instance_number = _number(ds, "InstanceNumber", int)
    if not transfer_syntax:
        meta = getattr(ds, "file_meta", None)
        transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
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
        has_pixels=pixels,
        image_type=tuple(t.upper() for t in _texts(ds, "ImageType")),
        convolution_kernel="\\".join(_texts(ds, "ConvolutionKernel")),
        slice_thickness_mm=thickness if thickness is not None and thickness >= 0 else None,
        series_number=int(series_number) if series_number is not None else None,
        instance_number=int(instance_number) if instance_number is not None else None,
        rows=_count(ds, "Rows") if pixels else 0,
        columns=_count(ds, "Columns") if pixels else 0,
        frames=frames,
        bits_allocated=_count(ds, "BitsAllocated") if pixels else 0,
        transfer_syntax_uid=transfer_syntax if valid_uid(transfer_syntax) else "",
        source="dicom",
        calling_ae=calling_ae,
        association_id=association_id,
    )
