"""Non-image storage objects a real study comes with, sent by dcmtk's storescu.

A CT scanner sends an X-Ray Radiation Dose SR with (often before) the images; a PACS
forwards key object selections, presentation states and scanned PDFs. Each is stored as
received and published with has_pixels=False (the router leaves it alone); none may
fail, because a sender that gets a failure for one object stops its whole send.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from pydicom import dcmread
from pydicom import uid as uids
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from radtriage.blobstore import LocalBlobStore
from tests.support.dicom import Listener, send_files
from tests.support.dicom_objects import with_meta
from tests.support.kafka import read_topic

pytestmark = [pytest.mark.integration]

# A minimal PDF document (a header, one empty page, the trailer): the bytes are kept as sent.
PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)


STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _common(sop_class: str, modality: str, study: Dataset, series_number: int) -> Dataset:
    """Patient, study, series and SOP common modules, the study taken from a CT image."""
    now = datetime.now(UTC)
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    for keyword in STUDY_KEYWORDS:
        setattr(ds, keyword, study.get(keyword, ""))
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "radtriage test"
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    return with_meta(ds)


def _evidence(images: list[Dataset]) -> Sequence:
    """CurrentRequestedProcedureEvidenceSequence / ReferencedSeriesSequence content."""
    series = Dataset()
    series.SeriesInstanceUID = images[0].SeriesInstanceUID
    refs = []
    for image in images:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = image.SOPClassUID, image.SOPInstanceUID
        refs.append(ref)
    series.ReferencedSOPSequence = Sequence(refs)
    study = Dataset()
    study.StudyInstanceUID = images[0].StudyInstanceUID
    study.ReferencedSeriesSequence = Sequence([series])
    return Sequence([study])


def _sr_document(ds: Dataset, title: Dataset, template: str, content: list[Dataset]) -> Dataset:
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([title])
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    tid = Dataset()
    tid.MappingResource, tid.TemplateIdentifier = "DCMR", template
    ds.ContentTemplateSequence = Sequence([tid])
    ds.ContentSequence = Sequence(content)
    return ds


def dose_sr(images: list[Dataset]) -> Dataset:
    """An X-Ray Radiation Dose SR (TID 10011 CT Radiation Dose), accumulated DLP only."""
    ds = _common(uids.XRayRadiationDoseSRStorage, "SR", images[0], 997)
    dlp = Dataset()
    dlp.RelationshipType, dlp.ValueType = "CONTAINS", "NUM"
    dlp.ConceptNameCodeSequence = Sequence([_code("113813", "DCM", "CT Dose Length Product Total")])
    value = Dataset()
    value.NumericValue = "812.4"
    value.MeasurementUnitsCodeSequence = Sequence([_code("mGy.cm", "UCUM", "mGy.cm")])
    dlp.MeasuredValueSequence = Sequence([value])
    accumulated = Dataset()
    accumulated.RelationshipType, accumulated.ValueType = "CONTAINS", "CONTAINER"
    accumulated.ConceptNameCodeSequence = Sequence([_code("113811", "DCM", "CT Accumulated Dose Data")])
    accumulated.ContinuityOfContent = "SEPARATE"
    accumulated.ContentSequence = Sequence([dlp])
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(images)
    return _sr_document(ds, _code("113701", "DCM", "X-Ray Radiation Dose Report"), "10011", [accumulated])


def key_object_selection(images: list[Dataset]) -> Dataset:
    """A KOS ("Of Interest") flagging the first image."""
    ds = _common(uids.KeyObjectSelectionDocumentStorage, "KO", images[0], 998)
    image = Dataset()
    image.RelationshipType, image.ValueType = "CONTAINS", "IMAGE"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = images[0].SOPClassUID, images[0].SOPInstanceUID
    image.ReferencedSOPSequence = Sequence([ref])
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(images[:1])
    return _sr_document(ds, _code("113000", "DCM", "Of Interest"), "2010", [image])


def encapsulated_pdf(images: list[Dataset]) -> Dataset:
    ds = _common(uids.EncapsulatedPDFStorage, "DOC", images[0], 999)
    ds.ConversionType = "SD"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "Requisition"
    ds.ConceptNameCodeSequence = Sequence()
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = PDF + (b"\0" if len(PDF) % 2 else b"")
    return ds


def presentation_state(images: list[Dataset]) -> Dataset:
    """A GSPS setting a brain window on the series."""
    ds = _common(uids.GrayscaleSoftcopyPresentationStateStorage, "PR", images[0], 996)
    ds.ContentLabel = "BRAIN"
    ds.ContentDescription = "brain window"
    ds.PresentationCreationDate, ds.PresentationCreationTime = ds.ContentDate, ds.ContentTime
    ds.ContentCreatorName = ""
    ds.ReferencedSeriesSequence = _evidence(images)[0].ReferencedSeriesSequence
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = "40", "80"
    ds.SoftcopyVOILUTSequence = Sequence([voi])
    ds.PresentationLUTShape = "IDENTITY"
    return ds


BUILDERS = {
    "dose-sr": dose_sr,
    "kos": key_object_selection,
    "pdf": encapsulated_pdf,
    "gsps": presentation_state,
}


@pytest.fixture
def ct_files(tmp_path: Path) -> list[Path]:
    ph = head_ct_phantom(np.random.default_rng(21), bleed=False, shape=(6, 64, 64))
    return write_ct_series(ph.hu, ph.spacing_zyx, tmp_path / "ct", accession="ACCNI", patient_id="MRNNI")


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _successes() -> float:
    return (
        REGISTRY.get_sample_value("radtriage_dicom_c_store_total", {"outcome": "success", "status": "0x0000"})
        or 0.0
    )


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_each_non_image_object_is_stored_and_published_without_pixels(
    kind: str,
    listener: Listener,
    ct_files: list[Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="connectors.dicom")
    images = [dcmread(f) for f in ct_files]
    ds = BUILDERS[kind](images)
    path = _save(ds, tmp_path / f"{kind}.dcm")
    before = _successes()

    out = send_files(listener, [path])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Received Store Response (Success)" in out.stdout + out.stderr
    assert _successes() == before + 1
    assert "refused" not in caplog.text

    records = read_topic(listener.settings.kafka.bootstrap_servers, listener.topic, 2)
    (event,) = [r.value for r in records if r.value["kind"] == "instance"]
    (marker,) = [r.value for r in records if r.value["kind"] == "transfer_complete"]
    assert (event["sop_class_uid"], event["sop_instance_uid"]) == (ds.SOPClassUID, ds.SOPInstanceUID)
    assert event["study_uid"] == images[0].StudyInstanceUID and marker["instance_count"] == 1
    assert event["modality"] == ds.Modality
    assert (event["has_pixels"], event["frames"], event["rows"], event["columns"]) == (False, 0, 0, 0)
    assert event["bits_allocated"] == 0 and event["image_type"] == []
    assert event["series_number"] == ds.SeriesNumber
    assert event["transfer_syntax_uid"] == uids.ExplicitVRLittleEndian

    stored = dcmread(LocalBlobStore(listener.settings.blob_dir).path_of(event["blob_uri"]))
    assert stored == dcmread(path)  # every element as sent
    if kind == "pdf":
        assert stored.EncapsulatedDocument.rstrip(b"\0") == PDF


def test_a_dose_sr_sent_first_does_not_stop_the_series(
    listener: Listener,
    ct_files: list[Path],
    tmp_path: Path,
) -> None:
    # What a CT scanner does: the dose report first, then the images, one association.
    images = [dcmread(f) for f in ct_files]
    sr = _save(dose_sr(images), tmp_path / "dose.dcm")
    out = send_files(listener, [sr, *ct_files])
    assert out.returncode == 0, out.stdout + out.stderr
    assert (out.stdout + out.stderr).count("Received Store Response (Success)") == 1 + len(ct_files)

    records = read_topic(listener.settings.kafka.bootstrap_servers, listener.topic, len(ct_files) + 2)
    instances = [r.value for r in records if r.value["kind"] == "instance"]
    (marker,) = [r.value for r in records if r.value["kind"] == "transfer_complete"]
    assert sorted(e["sop_instance_uid"] for e in instances if e["has_pixels"]) == sorted(
        str(i.SOPInstanceUID) for i in images
    )
    assert [e["modality"] for e in instances if not e["has_pixels"]] == ["SR"]
    assert marker["instance_count"] == len(ct_files) + 1
    assert all(e["rows"] == e["columns"] == 64 and e["frames"] == 1 for e in instances if e["has_pixels"])
    assert len(list(listener.settings.blob_dir.rglob("*.dcm"))) == len(ct_files) + 1
