"""The TID 1500 SR of a finding (processors/dicom_results.py): parsed back with highdicom,
its content items, codes and references checked, its UIDs stable, and the written file
validated by dicom3tools' dciodvfy (an IOD validator independent of highdicom)."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from models.dicom_writer import write_ct_series
from processors.dicom_results import (
    ABSENT,
    ASSESSMENT_CATEGORY,
    DIAMETER,
    LATERALITY,
    PRESENT,
    PROBABILITY,
    THRESHOLD,
    ResultError,
    build_sr,
    encode,
    read_headers,
    sr_uids,
)
from processors.result_marker import is_radtriage_result
from schemas.findings import BiradsAssessment, Finding, LungNodule, SliceRange
from tests.support.findings import ich_result

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1001", "1.2.826.0.1.3680043.8.498.1001.2"
WHEN = datetime(2026, 12, 7, 8, 0, 0, tzinfo=UTC)
DCIODVFY = Path("/usr/bin/dciodvfy")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """The headers of a 12-slice head CT, 5 mm apart."""
    hu = np.full((12, 16, 16), 40.0)
    out = tmp_path_factory.mktemp("ct")
    files = write_ct_series(
        hu,
        (5.0, 1.0, 1.0),
        out,
        study_uid=STUDY,
        series_uid=SERIES,
        accession="ACC-18",
        patient_id="MRN-18",
        patient_name="Doe^Jane",
    )
    return read_headers(files)


def finding(**fields: Any) -> Finding:
    return ich_result(
        STUDY,
        SERIES,
        WHEN,
        **({"accession_number": "ACC-18", "patient_id": "MRN-18", "probability": 0.91} | fields),
    )


def parsed(ds: Dataset) -> hd.sr.Comprehensive3DSR:
    # Through the bytes, as a PACS would hand it back.
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(pydicom.filebase.DicomBytesIO(encode(ds))))


def the_group(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    (group,) = sr.content.get_image_measurement_groups()
    return group


def value_of(group: Any, name: hd.sr.CodedConcept) -> float:
    (measurement,) = group.get_measurements(name=name)
    return float(measurement.value)


def evaluation(group: Any, name: hd.sr.CodedConcept) -> hd.sr.CodedConcept:
    (item,) = [e for e in group.get_qualitative_evaluations() if e.name == name]
    return item.value


def test_positive_ich_sr_says_what_the_finding_says(sources: list[Dataset]) -> None:
    z = [float(ds.ImagePositionPatient[2]) for ds in sources]
    f = finding(
        slice_range=SliceRange(
            first_instance_number=4,
            last_instance_number=7,
            first_position_mm=z[3],
            last_position_mm=z[6],
            slices=4,
        )
    )
    sr = parsed(build_sr(f, sources))
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.Modality == "SR"
    # Patient and study are the source study's: the PACS files the SR with the images.
    assert (sr.StudyInstanceUID, sr.PatientID, sr.AccessionNumber) == (STUDY, "MRN-18", "ACC-18")
    assert str(sr.PatientName) == "Doe^Jane"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert is_radtriage_result(sr)

    # Observer: the model as a device of manufacturer radtriage (TID 1004).
    (device,) = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = device.observer_identifying_attributes
    assert attributes.name == "ich_classifier"
    assert attributes.manufacturer_name == "radtriage"

    group = the_group(sr)
    concept = hd.sr.CodedConcept("1386000", "SCT", "Intracranial hemorrhage")
    assert group.finding_type == concept
    assert evaluation(group, concept) == PRESENT
    assert value_of(group, PROBABILITY) == pytest.approx(0.91)
    assert value_of(group, THRESHOLD) == pytest.approx(0.5)
    assert group.tracking_uid == sr_uids(f).tracking_uid
    # The algorithm (TID 4019): name and version.
    texts = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT"
    }
    assert texts["Algorithm Name"] == "ich_classifier"
    assert texts["Algorithm Version"] == "1"
    assert texts["Algorithm Manufacturer"] == "radtriage"

    # The slice range as the group's source images: exactly the slices 4..7.
    wanted = {str(ds.SOPInstanceUID) for ds in sources[3:7]}
    assert {str(img.referenced_sop_instance_uid) for img in group.source_images} == wanted

    # Every instance of the series is in the evidence: references resolve to the sources.
    (study_item,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert study_item.StudyInstanceUID == STUDY
    (series_item,) = study_item.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == SERIES
    assert {str(i.ReferencedSOPInstanceUID) for i in series_item.ReferencedSOPSequence} == {
        str(ds.SOPInstanceUID) for ds in sources
    }
    assert "PredecessorDocumentsSequence" not in sr


def test_negative_finding_is_absent(sources: list[Dataset]) -> None:
    sr = parsed(build_sr(finding(probability=0.1, positive=False), sources))
    group = the_group(sr)
    assert evaluation(group, group.finding_type) == ABSENT
    assert group.source_images == []


def test_uids_are_the_same_on_a_retry_and_differ_per_request_and_model_version(
    sources: list[Dataset],
) -> None:
    first, retry = build_sr(finding(), sources), build_sr(finding(), sources)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (retry.SOPInstanceUID, retry.SeriesInstanceUID)
    # Same content too (the finding's time, not the build's): the PACS gets the same object.
    assert encode(first) == encode(retry)
    other_request = build_sr(finding(request_id="another"), sources)
    other_version = build_sr(finding(model_version="2"), sources)
    uids = {first.SOPInstanceUID, other_request.SOPInstanceUID, other_version.SOPInstanceUID}
    assert len(uids) == 3
    assert all(pydicom.uid.UID(u).is_valid for u in uids)


def test_an_amended_finding_references_its_predecessor(sources: list[Dataset]) -> None:
    first = finding(request_id="req-1")
    amended = finding(request_id="req-2", amends_request_id="req-1", probability=0.97)
    sr = parsed(build_sr(amended, sources))
    assert sr.SOPInstanceUID != sr_uids(first).sop_uid
    (study_item,) = sr.PredecessorDocumentsSequence
    (series_item,) = study_item.ReferencedSeriesSequence
    (item,) = series_item.ReferencedSOPSequence
    assert study_item.StudyInstanceUID == STUDY
    assert series_item.SeriesInstanceUID == sr_uids(first).series_uid
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (
        Comprehensive3DSRStorage,
        sr_uids(first).sop_uid,
    )


def test_lvo_side_nodules_and_birads(sources: list[Dataset]) -> None:
    lvo = the_group(
        parsed(
            build_sr(
                finding(
                    finding="LVO",
                    model_name="lvo_detector",
                    laterality="left",
                    laterality_probability=0.8,
                ),
                sources,
            )
        )
    )
    assert evaluation(lvo, LATERALITY) == hd.sr.CodedConcept("7771000", "SCT", "Left")

    nodules = (
        LungNodule(centre_lps_mm=(-40.0, 10.0, -5.0), diameter_mm=8.5, probability=0.88, lung="left"),
        LungNodule(centre_lps_mm=(35.0, 0.0, 10.0), diameter_mm=5.0, probability=0.6, lung="right"),
    )
    sr = parsed(build_sr(finding(finding="NODULE", model_name="nodule_detector", nodules=nodules), sources))
    rois = sr.content.get_planar_roi_measurement_groups()
    assert len(rois) == 2
    for roi, nodule in zip(rois, nodules, strict=True):
        region = roi.roi
        assert region.GraphicType == "POINT"
        assert region.ReferencedFrameOfReferenceUID == sources[0].FrameOfReferenceUID
        assert np.allclose(region.value, [nodule.centre_lps_mm])
        assert value_of(roi, DIAMETER) == pytest.approx(nodule.diameter_mm)
        assert value_of(roi, PROBABILITY) == pytest.approx(nodule.probability)

    birads = BiradsAssessment(category=4, probability=0.7, side="right", views=("RCC", "RMLO"))
    group = the_group(
        parsed(build_sr(finding(finding="BIRADS", model_name="mammo_birads", birads=birads), sources))
    )
    assert evaluation(group, ASSESSMENT_CATEGORY).value == "397144001"
    # No SNOMED concept for this model's finding: radtriage's own (private) code.
    assert group.finding_type.scheme_designator == "99RADTRIAGE"


def test_no_source_instance_is_a_clear_error() -> None:
    with pytest.raises(ResultError, match="no source instance"):
        build_sr(finding(), [])


def test_phantom_images_are_not_taken_for_radtriage_results(sources: list[Dataset]) -> None:
    # The phantoms say Manufacturer "radtriage" too, and must still be ingested.
    assert sources[0].Manufacturer == "radtriage"
    assert not is_radtriage_result(sources[0])


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"probability": 0.1, "positive": False},
        {"amends_request_id": "req-0"},
        {
            "finding": "NODULE",
            "model_name": "nodule_detector",
            "nodules": (
                LungNodule(centre_lps_mm=(-40.0, 10.0, -5.0), diameter_mm=8.5, probability=0.88, lung="left"),
            ),
        },
    ],
    ids=["positive", "negative", "amended", "nodule"],
)
def test_dciodvfy_finds_no_error(sources: list[Dataset], tmp_path: Path, fields: dict[str, Any]) -> None:
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(build_sr(finding(**fields), sources)))
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == [], "\n".join(lines)
