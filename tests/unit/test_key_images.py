"""Key image and KOS of a positive finding (processors/key_images.py): the slice chosen,
the localisation and the banner drawn in, the references, and dciodvfy on both objects."""

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
from pydicom.uid import KeyObjectSelectionDocumentStorage, SecondaryCaptureImageStorage

from models.dicom_writer import write_ct_series
from processors.dicom_results import ResultError, encode, read_headers
from processors.key_images import build_key_image, build_kos, key_slice
from processors.result_marker import is_radtriage_result
from schemas.findings import Finding, LungNodule, SliceRange
from tests.support.findings import ich_result

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1802", "1.2.826.0.1.3680043.8.498.1802.2"
WHEN = datetime(2026, 12, 7, 8, 0, 0, tzinfo=UTC)


def finding(**fields: Any) -> Finding:
    return ich_result(STUDY, SERIES, WHEN, **({"patient_id": "MRN-18", "probability": 0.91} | fields))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """Headers of a 12-slice 96 x 96 CT of soft tissue, 5 mm apart (each keeps its filename)."""
    hu = np.random.default_rng(18).normal(40.0, 5.0, (12, 96, 96))
    files = write_ct_series(
        hu,
        (5.0, 1.0, 1.0),
        tmp_path_factory.mktemp("ct"),
        study_uid=STUDY,
        series_uid=SERIES,
        patient_id="MRN-18",
    )
    return read_headers(files)


def _z(ds: Dataset) -> float:
    return float(ds.ImagePositionPatient[2])


def _ich(sources: list[Dataset]) -> SliceRange:
    return SliceRange(
        first_instance_number=4,
        last_instance_number=8,
        first_position_mm=_z(sources[3]),
        last_position_mm=_z(sources[7]),
        slices=5,
    )


def test_the_key_slice_is_the_middle_of_the_range_or_the_nodule_s(sources: list[Dataset]) -> None:
    assert key_slice(finding(slice_range=_ich(sources)), sources) is sources[5]
    nodule = LungNodule(
        centre_lps_mm=(10.0, 5.0, _z(sources[9]) + 1.0), diameter_mm=8.0, probability=0.9, lung="left"
    )
    f = finding(finding="NODULE", model_name="nodule_detector", nodules=(nodule,))
    assert key_slice(f, sources) is sources[9]
    assert key_slice(finding(finding="LVO", model_name="lvo_detector"), sources) is sources[6]


def test_key_image_of_a_nodule_draws_it_and_the_banner(sources: list[Dataset]) -> None:
    nodule = LungNodule(
        centre_lps_mm=(10.0, 5.0, _z(sources[9])), diameter_mm=12.0, probability=0.9, lung="left"
    )
    f = finding(finding="NODULE", model_name="nodule_detector", nodules=(nodule,))
    source = pydicom.dcmread(key_slice(f, sources).filename)
    sc = build_key_image(f, source)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert (sc.StudyInstanceUID, sc.PatientID) == (STUDY, "MRN-18")
    assert sc.BurnedInAnnotation == "YES" and is_radtriage_result(sc)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    rgb = sc.pixel_array
    assert rgb.shape == (96, 96, 3)
    red = (rgb[:, :, 0] > 200) & (rgb[:, :, 1] < 100)
    rows, columns = np.nonzero(red)
    # The circle is around the nodule's pixel: column (x - x0) / dx, row (y - y0) / dy.
    x0, y0 = (float(v) for v in source.ImagePositionPatient[:2])
    assert abs(columns.mean() - (10.0 - x0)) < 2 and abs(rows.mean() - (5.0 - y0)) < 2
    # The banner: yellow text on black at the top.
    banner = rgb[:14]
    assert ((banner[:, :, 0] > 200) & (banner[:, :, 2] < 100)).any()
    # The same finding gives the same instance.
    again = build_key_image(f, source)
    assert again.SOPInstanceUID == sc.SOPInstanceUID and encode(again) == encode(sc)


def test_kos_references_the_key_image(sources: list[Dataset]) -> None:
    f = finding(slice_range=_ich(sources))
    sc = build_key_image(f, pydicom.dcmread(key_slice(f, sources).filename))
    kos = build_kos(f, [sc])
    assert kos.SOPClassUID == KeyObjectSelectionDocumentStorage and is_radtriage_result(kos)
    parsed = hd.ko.KeyObjectSelectionDocument.from_dataset(
        pydicom.dcmread(pydicom.filebase.DicomBytesIO(encode(kos)))
    )
    assert parsed.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    images = [item for item in parsed.ContentSequence if item.ValueType == "IMAGE"]
    assert [str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in images] == [sc.SOPInstanceUID]
    (study_item,) = kos.CurrentRequestedProcedureEvidenceSequence
    (series_item,) = study_item.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == sc.SeriesInstanceUID
    assert kos.StudyInstanceUID == STUDY


def test_a_negative_finding_has_no_key_image(sources: list[Dataset]) -> None:
    with pytest.raises(ResultError, match="positive"):
        build_key_image(finding(probability=0.1, positive=False), pydicom.dcmread(sources[0].filename))


def test_dciodvfy_finds_no_error_in_key_image_and_kos(sources: list[Dataset], tmp_path: Path) -> None:
    f = finding(slice_range=_ich(sources))
    sc = build_key_image(f, pydicom.dcmread(key_slice(f, sources).filename))
    for name, ds in (("sc", sc), ("kos", build_kos(f, [sc]))):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(encode(ds))
        run = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True, check=False)
        lines = (run.stdout + run.stderr).splitlines()
        assert [line for line in lines if line.startswith("Error")] == [], "\n".join(lines)
