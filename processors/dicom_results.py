"""A finding as DICOM the PACS shows: a Comprehensive 3D SR following TID 1500 (issue 18).

Pure: a `Finding` and the headers of the source series' instances in, a pydicom Dataset
out (built with highdicom, which does the IOD bookkeeping). What the SR says
(docs/ARCHITECTURE.md, "Results to the PACS"):

- the observer context is a device: the model (TID 1004, manufacturer radtriage);
- one measurement group (TID 1501) for the finding, with the algorithm (TID 4019: name,
  version, manufacturer, the threshold as its parameter), the finding's concept (its
  model's SNOMED CT code, models/<name>/spec.py) qualified Present or Absent, the
  probability and the threshold as numeric measurements, the LVO side, the BI-RADS
  suggestion, and as its source images the slices of the ICH slice range;
- one planar ROI group (TID 1410) per lung nodule: a SCOORD3D point at its centre, its
  diameter and probability, the lung as finding site;
- the evidence sequence (Current Requested Procedure Evidence) lists every instance of the
  series the model read; the Image Library (TID 1600) is left out, for its cost.

UIDs are derived from (study, finding, model, model version, request), so a retried
send is the same instance (the PACS replaces or ignores it) and an amended finding
(a later series read for the same request's rule) is a new instance whose Predecessor
Documents Sequence names the SR of the request it amends.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage
from pydicom.valuerep import DA, TM

from models import registry
from processors.fhir_report import BIRADS_CATEGORIES
from processors.result_marker import MANUFACTURER, RESULTS_MODEL_NAME
from schemas.findings import Finding, LungNodule, SliceRange

# Namespace of the name-based (uuid5) UUIDs the result UIDs are made of: a UID under the
# 2.25 arc is a UUID in decimal (ISO/IEC 9834-8, PS3.5 B.2); no registered root needed.
_UID_NAMESPACE = uuid.UUID("9d7e3c1a-4b52-4f0e-8a86-2f6b1c0d5e18")
# radtriage's own codes (PS3.16 8.2: a private scheme designator starts with "99").
PRIVATE_SCHEME = "99RADTRIAGE"
PRIVATE_SCHEME_ITEM = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="radtriage AI triage findings",
    responsible_organization="radtriage",
)
SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "AI triage result - not for diagnostic use"
# Slices within this distance (mm) of the slice range's ends count as inside it: the
# range's positions are read from the same headers, so only rounding separates them.
_POSITION_TOLERANCE_MM = 0.01

PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
THRESHOLD = hd.sr.CodedConcept("122411", "DCM", "Threshold Value")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
MILLIMETRE = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
LATERALITY = hd.sr.CodedConcept("272741003", "SCT", "Laterality")
SIDES = {
    "left": hd.sr.CodedConcept("7771000", "SCT", "Left"),
    "right": hd.sr.CodedConcept("24028007", "SCT", "Right"),
}
ASSESSMENT_CATEGORY = hd.sr.CodedConcept("111005", "DCM", "Assessment Category")
NODULE = hd.sr.CodedConcept("27925004", "SCT", "Nodule")
LUNG = hd.sr.CodedConcept("39607008", "SCT", "Lung")
DIAMETER = hd.sr.CodedConcept("81827009", "SCT", "Diameter")
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")


class ResultError(ValueError):
    """A finding whose SR cannot be built (no source instance to reference, say)."""


def result_uid(*parts: str) -> str:
    """A UID determined by `parts` alone (2.25 + the decimal of their uuid5)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


@dataclass(frozen=True)
class ResultUids:
    series_uid: str
    sop_uid: str
    tracking_uid: str


def request_key(finding: Finding) -> str:
    """What tells one read of a study apart: the request it answers (a finding from before
    request ids: its series)."""
    return finding.request_id or finding.series_uid


def finding_uids(finding: Finding, kind: str, request: str | None = None) -> tuple[str, str]:
    """(series, SOP instance) UIDs of the finding's result object of `kind` ("sr", "seg",
    "sc", ...), or of the one answering `request`: the same study, finding, model version
    and request always give the same UIDs, so a retry sends the same instance."""
    base = _identity(finding, request)
    return result_uid(f"{kind}-series", *base), result_uid(kind, *base)


def _identity(finding: Finding, request: str | None) -> tuple[str, ...]:
    return (
        finding.study_uid,
        finding.finding,
        finding.model_name,
        finding.model_version,
        request if request is not None else request_key(finding),
    )


def sr_uids(finding: Finding, request: str | None = None) -> ResultUids:
    """The SR's UIDs for this finding, or for the one of `request` (its predecessor)."""
    series_uid, sop_uid = finding_uids(finding, "sr", request)
    return ResultUids(series_uid, sop_uid, result_uid("sr-tracking", *_identity(finding, request)))


def stamp_creation(ds: Dataset, inferred: datetime) -> None:
    """highdicom stamps the build time (instance creation, its own contribution as
    processing equipment); the finding's time instead keeps a retry byte-identical."""
    ds.InstanceCreationDate = DA(inferred.strftime("%Y%m%d"))
    ds.InstanceCreationTime = TM(inferred.strftime("%H%M%S"))
    for equipment in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = inferred.strftime("%Y%m%d%H%M%S")


def device_uid(finding: Finding) -> str:
    """The observer device: one model at one version."""
    return result_uid("device", finding.model_name, finding.model_version)


def device_observer(finding: Finding) -> hd.sr.ObserverContext:
    """The model as the observing device, as the SR and the KOS both name it."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(finding),
            name=finding.model_name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{finding.model_name} {finding.model_version}".strip(),
        ),
    )


def finding_concept(finding: Finding) -> hd.sr.CodedConcept:
    """The finding's SNOMED CT concept from its model's spec, else radtriage's own code."""
    spec = registry.for_finding(finding.finding)
    if spec.snomed is not None:
        return hd.sr.CodedConcept(spec.snomed[0], "SCT", spec.snomed[1])
    return hd.sr.CodedConcept(finding.finding, PRIVATE_SCHEME, f"AI triage: {spec.words}")


def read_headers(paths: Sequence[Path]) -> list[Dataset]:
    """The source instances' headers (no pixel data), in InstanceNumber order."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return sorted(headers, key=lambda ds: (int(ds.get("InstanceNumber") or 0), str(ds.SOPInstanceUID)))


def _position_along_normal(ds: Dataset) -> float | None:
    """Where a single-frame slice lies along its slice normal (mm), or None without geometry."""
    iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if iop is None or ipp is None or len(iop) != 6 or len(ipp) != 3:
        return None
    normal = np.cross(np.array(iop[:3], dtype=float), np.array(iop[3:], dtype=float))
    return float(np.dot(normal, np.array(ipp, dtype=float)))


def slices_in_range(sources: Sequence[Dataset], slice_range: SliceRange) -> list[Dataset]:
    """The source slices inside a slice range, by position along the slice normal."""
    low = slice_range.first_position_mm - _POSITION_TOLERANCE_MM
    high = slice_range.last_position_mm + _POSITION_TOLERANCE_MM
    inside = []
    for ds in sources:
        where = _position_along_normal(ds)
        if where is not None and low <= where <= high:
            inside.append(ds)
    return inside


def _qualitative(finding: Finding, concept: hd.sr.CodedConcept) -> list[hd.sr.QualitativeEvaluation]:
    evaluations = [hd.sr.QualitativeEvaluation(concept, PRESENT if finding.positive else ABSENT)]
    if finding.laterality in SIDES:
        evaluations.append(hd.sr.QualitativeEvaluation(LATERALITY, SIDES[finding.laterality]))
    if finding.birads is not None and finding.birads.category in BIRADS_CATEGORIES:
        _, code, display = BIRADS_CATEGORIES[finding.birads.category]
        evaluations.append(
            hd.sr.QualitativeEvaluation(ASSESSMENT_CATEGORY, hd.sr.CodedConcept(code, "SCT", display[:64]))
        )
    return evaluations


def _number(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept) -> hd.sr.Measurement:
    # Rounded: the SR's numeric value is a DS (at most 16 characters).
    return hd.sr.Measurement(name=name, value=round(float(value), 6), unit=unit)


def _nodule_group(
    finding: Finding,
    index: int,
    nodule: LungNodule,
    frame_of_reference_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    tracking = hd.sr.TrackingIdentifier(
        uid=result_uid("nodule", sr_uids(finding).sop_uid, str(index)),
        identifier=f"nodule {index + 1}",
    )
    point = hd.sr.ImageRegion3D(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.array([nodule.centre_lps_mm], dtype=float),
        frame_of_reference_uid=frame_of_reference_uid,
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=point,
        finding_type=NODULE,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(LUNG, laterality=SIDES[nodule.lung])],
        measurements=[
            _number(DIAMETER, nodule.diameter_mm, MILLIMETRE),
            _number(PROBABILITY, nodule.probability, NO_UNITS),
        ],
    )


def build_sr(finding: Finding, sources: Sequence[Dataset], software_version: str = "") -> Dataset:
    """The finding's Comprehensive 3D SR (TID 1500), referencing `sources` (headers of the
    instances of the series the model read, as `read_headers` returns them)."""
    if not sources:
        raise ResultError(f"no source instance of series {finding.series_uid} to reference")
    others = {str(ds.StudyInstanceUID) for ds in sources} - {finding.study_uid}
    if others:
        raise ResultError(f"source instances of other studies: {sorted(others)}")
    uids = sr_uids(finding)
    concept = finding_concept(finding)
    algorithm = hd.sr.AlgorithmIdentification(
        name=finding.model_name,
        version=finding.model_version or "unknown",
        parameters=[f"threshold={finding.threshold:g}"],
        manufacturer=MANUFACTURER,
    )
    observer = hd.sr.ObservationContext(observer_device_context=device_observer(finding))
    in_range = slices_in_range(sources, finding.slice_range) if finding.slice_range is not None else []
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking_uid, identifier=f"{finding.finding} ({finding.model_name})"
        ),
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=[
            _number(PROBABILITY, finding.probability, NO_UNITS),
            _number(THRESHOLD, finding.threshold, NO_UNITS),
        ],
        qualitative_evaluations=_qualitative(finding, concept),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in in_range] or None,
    )
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = [group]
    frame_of_reference = str(sources[0].get("FrameOfReferenceUID", "") or "")
    if finding.nodules and frame_of_reference:
        groups += [
            _nodule_group(finding, i, nodule, frame_of_reference, algorithm)
            for i, nodule in enumerate(finding.nodules)
        ]
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=groups,
        # No Image Library (TID 1600, optional): one entry per slice with its geometry
        # cost ~40 ms of CPU and ~4 kB a slice (6 s, 800 kB for a 200-slice CT). Every
        # instance read is named in the evidence sequence instead.
    )
    predecessors = []
    if finding.amends_request_id:
        earlier = sr_uids(finding, finding.amends_request_id)
        predecessor = Dataset()
        predecessor.StudyInstanceUID = finding.study_uid
        predecessor.SeriesInstanceUID = earlier.series_uid
        predecessor.SOPInstanceUID = earlier.sop_uid
        predecessor.SOPClassUID = Comprehensive3DSRStorage
        predecessors.append(predecessor)
    inferred = finding.inferred_at
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources),
        content=report,
        series_instance_uid=uids.series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=RESULTS_MODEL_NAME,
        software_versions=software_version or finding.model_version or "unknown",
        series_description=SR_SERIES_DESCRIPTION,
        is_complete=True,
        previous_versions=predecessors or None,
        # A private scheme is declared where it is used (PS3.3 C.12.1.1.2.1).
        coding_schemes=[PRIVATE_SCHEME_ITEM] if concept.scheme_designator == PRIVATE_SCHEME else None,
        # The finding's time, not the build's: a retry builds the same content.
        content_date=inferred.date(),
        content_time=inferred.time().replace(tzinfo=None),
        series_date=inferred.date(),
        series_time=inferred.time().replace(tzinfo=None),
    )
    stamp_creation(sr, inferred)
    return sr


def encode(ds: Dataset) -> bytes:
    """The dataset as a Part 10 file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
