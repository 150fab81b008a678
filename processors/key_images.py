"""A positive finding as a key image and a KOS, for PACS that show neither SR nor SEG.

Pure: a `Finding` and source instances in, pydicom Datasets out (highdicom). The key image
is a Secondary Capture (RGB, 8 bits) of one source slice, windowed for what the model
looks at, with the localisation drawn in (a red circle on each nodule of that slice, a red
frame on a slice of the ICH slice range) and a burned-in banner "AI triage - not for
diagnostic use" naming the finding, its probability and the model. The Key Object
Selection document ("Of Interest", the model as observer device) references it, so a
viewer that shows key images flags it in the study.

Which slice (`key_slice`): the middle of the ICH slice range; the slice nearest the
likeliest nodule's centre; otherwise the middle slice of the series.
UIDs as the SR's (processors/dicom_results.py): derived from the finding, so a retry sends
the same instances.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM

from models import registry
from processors.dicom_results import (
    ResultError,
    _position_along_normal,
    device_observer,
    finding_uids,
    slices_in_range,
)
from processors.result_marker import MANUFACTURER, RESULTS_MODEL_NAME
from schemas.findings import Finding

BANNER = "AI triage - not for diagnostic use"
KEY_IMAGE_SERIES_NUMBER = 9902
KOS_SERIES_NUMBER = 9903
# Windows (centre, width) in HU by the finding read on a CT: blood and vessels in the
# brain window, nodules in the lung window.
_WINDOWS = {"ICH": (40.0, 80.0), "LVO": (40.0, 80.0), "NODULE": (-600.0, 1500.0)}
_RED = (255, 40, 40)


def key_slice(finding: Finding, sources: Sequence[Dataset]) -> Dataset:
    """The source instance (header) the key image is made of."""
    if not sources:
        raise ResultError(f"no source instance of series {finding.series_uid} for a key image")
    positioned = [(where, ds) for ds in sources if (where := _position_along_normal(ds)) is not None]
    positioned.sort(key=lambda pair: pair[0])
    if finding.slice_range is not None:
        inside = slices_in_range([ds for _, ds in positioned], finding.slice_range)
        if inside:
            return inside[len(inside) // 2]
    if finding.nodules and positioned:
        z = finding.nodules[0].centre_lps_mm[2]
        return min(positioned, key=lambda pair: abs(pair[0] - z))[1]
    ordered = [ds for _, ds in positioned] or list(sources)
    return ordered[len(ordered) // 2]


def _to_rgb(finding: Finding, ds: Dataset) -> np.ndarray:
    """The slice as 8-bit grey in RGB: windowed in HU on a CT, 1-99 % percentiles otherwise."""
    pixels = ds.pixel_array.astype(np.float32)
    if pixels.ndim != 2:
        raise ResultError(
            f"key image of a {pixels.ndim}-D pixel array (multi-frame or colour) is not supported"
        )
    pixels = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    if ds.get("Modality") == "CT" and finding.finding in _WINDOWS:
        centre, width = _WINDOWS[finding.finding]
        low, high = centre - width / 2, centre + width / 2
    else:
        low, high = (float(v) for v in np.percentile(pixels, [1, 99]))
        high = max(high, low + 1.0)
    grey = np.clip((pixels - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = (255 - grey).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _pixel_of(ds: Dataset, point_lps: Sequence[float]) -> tuple[float, float]:
    """(column, row) of a patient point projected on the slice's plane."""
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    offset = np.array(point_lps, dtype=float) - np.array(ds.ImagePositionPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return float(offset @ iop[:3]) / column_spacing, float(offset @ iop[3:]) / row_spacing


def _draw(finding: Finding, ds: Dataset, rgb: np.ndarray) -> np.ndarray:
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    height, width = rgb.shape[:2]
    if finding.nodules and "ImagePositionPatient" in ds and "PixelSpacing" in ds:
        slice_z = _position_along_normal(ds)
        for nodule in finding.nodules:
            radius_mm = nodule.diameter_mm / 2
            if slice_z is not None and abs(nodule.centre_lps_mm[2] - slice_z) > radius_mm:
                continue  # not on this slice
            x, y = _pixel_of(ds, nodule.centre_lps_mm)
            r = max(radius_mm / float(ds.PixelSpacing[1]), 3.0) + 2.0
            draw.ellipse((x - r, y - r, x + r, y + r), outline=_RED, width=2)
    elif finding.slice_range is not None:
        draw.rectangle((1, 1, width - 2, height - 2), outline=_RED, width=3)
    words = registry.for_finding(finding.finding).words
    lines = [BANNER, f"{words}: p={finding.probability:.2f} (threshold {finding.threshold:.2f})"]
    lines.append(f"{finding.model_name} {finding.model_version}")
    banner = 12 * len(lines) + 4
    draw.rectangle((0, 0, width, banner), fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((4, 2 + 12 * i), line, fill=(255, 255, 0) if i == 0 else (255, 255, 255))
    return np.asarray(image, dtype=np.uint8)


def _orientation(ds: Dataset) -> tuple[str, str]:
    """Patient Orientation (row, column direction) from ImageOrientationPatient, main axis only."""
    iop = np.array(ds.get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0], dtype=float)
    letters = (("R", "L"), ("A", "P"), ("F", "H"))

    def letter(vector: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return letters[axis][1 if vector[axis] > 0 else 0]

    return letter(iop[:3]), letter(iop[3:])


def _stamp(ds: Dataset, finding: Finding) -> None:
    """Equipment and times every result object shares: the listener's marker, the finding's time."""
    inferred = finding.inferred_at
    ds.ManufacturerModelName = RESULTS_MODEL_NAME
    for keyword, value in (
        ("InstanceCreationDate", DA(inferred.strftime("%Y%m%d"))),
        ("InstanceCreationTime", TM(inferred.strftime("%H%M%S"))),
        ("ContentDate", DA(inferred.strftime("%Y%m%d"))),
        ("ContentTime", TM(inferred.strftime("%H%M%S"))),
        ("SeriesDate", DA(inferred.strftime("%Y%m%d"))),
        ("SeriesTime", TM(inferred.strftime("%H%M%S"))),
    ):
        setattr(ds, keyword, value)
    for equipment in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = inferred.strftime("%Y%m%d%H%M%S")


def build_key_image(finding: Finding, source: Dataset) -> Dataset:
    """The key image of a positive finding, drawn on `source` (a full instance, pixels included)."""
    if not finding.positive:
        raise ResultError("a key image is made for a positive finding only")
    series_uid, sop_uid = finding_uids(finding, "sc")
    rgb = _draw(finding, source, _to_rgb(finding, source))
    spacing = source.get("PixelSpacing")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=KEY_IMAGE_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        # highdicom annotates tuple[int, int]; the attribute is DS (mm, fractional).
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,  # type: ignore[arg-type]
        patient_orientation=_orientation(source),
        series_description=f"{BANNER} (key image)",
    )
    sc.DateOfSecondaryCapture = DA(finding.inferred_at.strftime("%Y%m%d"))
    sc.TimeOfSecondaryCapture = TM(finding.inferred_at.strftime("%H%M%S"))
    sc.BurnedInAnnotation = "YES"
    if "Laterality" not in sc:
        # Type 2C in General Series; empty: the image is not of one of a pair (dciodvfy asks).
        sc.Laterality = ""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    derivation = Dataset()
    derivation.ReferencedSOPClassUID = source.SOPClassUID
    derivation.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [derivation]
    _stamp(sc, finding)
    return sc


def build_kos(finding: Finding, key_images: Sequence[Dataset]) -> Dataset:
    """The Key Object Selection ("Of Interest") of a finding's key images."""
    if not key_images:
        raise ResultError("a KOS needs at least one key image")
    series_uid, sop_uid = finding_uids(finding, "kos")
    observer = device_observer(finding)
    words = registry.for_finding(finding.finding).words
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=list(key_images),
        observer_device_context=observer,
        description=f"{BANNER}: suspected {words} (p={finding.probability:.2f})"[:1024],
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=list(key_images),
        content=content,
        series_instance_uid=series_uid,
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=f"{BANNER} (key objects)",
    )
    _stamp(kos, finding)
    return kos
