"""CR/DX objects written by models/cxr_triage/writer.py and read back by processors/radiograph.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation

from connectors.dicom import validation
from models.cxr_triage.phantoms import chest_radiograph_phantom
from models.cxr_triage.writer import write_radiograph
from processors.dicom_volume import VolumeError
from processors.model_inputs import prepare_input
from processors.preprocessing import CXR_INPUT_SHAPE, preprocess_radiograph
from processors.radiograph import load_radiograph


@pytest.fixture(scope="module")
def radiograph():  # type: ignore[no-untyped-def]
    return chest_radiograph_phantom(np.random.default_rng(61), pneumothorax=True)


def test_dx_object_carries_the_radiograph_attributes(tmp_path: Path, radiograph) -> None:  # type: ignore[no-untyped-def]
    path = write_radiograph(
        radiograph.pixels, radiograph.pixel_mm, tmp_path, accession="ACC1", patient_id="P1"
    )
    ds = dcmread(path)
    assert ds.SOPClassUID == DigitalXRayImageStorageForPresentation == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "DX" and ds.PresentationIntentType == "FOR PRESENTATION"
    assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition == "PA"
    assert list(ds.PatientOrientation) == ["L", "F"]
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert [float(v) for v in ds.ImagerPixelSpacing] == pytest.approx(list(radiograph.pixel_mm))
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx(list(radiograph.pixel_mm))
    assert ds.AnatomicRegionSequence[0].CodeMeaning == "Chest"
    assert ds.ViewCodeSequence[0].CodeMeaning == "postero-anterior"
    assert (ds.Rows, ds.Columns) == radiograph.pixels.shape
    assert "ImagePositionPatient" not in ds and "NumberOfFrames" not in ds
    # The DICOM listener accepts it as a triaged image object.
    assert ds.SOPClassUID in validation.TRIAGED_SOP_CLASSES


@pytest.mark.parametrize(
    ("modality", "photometric", "mirrored"),
    [
        ("DX", "MONOCHROME2", False),
        ("DX", "MONOCHROME1", True),
        ("CR", "MONOCHROME1", False),
        ("CR", "MONOCHROME2", True),
    ],
)
def test_round_trip_gives_back_the_same_image_in_the_standard_orientation(
    tmp_path: Path,
    radiograph,
    modality: str,
    photometric: str,
    mirrored: bool,  # type: ignore[no-untyped-def]
) -> None:
    path = write_radiograph(
        radiograph.pixels,
        radiograph.pixel_mm,
        tmp_path,
        modality=modality,
        photometric=photometric,
        mirrored=mirrored,
    )
    ds = dcmread(path)
    assert ds.Modality == modality and ds.PhotometricInterpretation == photometric
    if modality == "CR":
        assert ds.SOPClassUID == ComputedRadiographyImageStorage
    image = load_radiograph([path])
    assert image.hu.shape == (1, *radiograph.pixels.shape)
    np.testing.assert_array_equal(image.hu[0], radiograph.pixels.astype(np.float32))
    assert image.spacing_zyx[1:] == pytest.approx(radiograph.pixel_mm)


def test_served_input_from_dicom_equals_the_training_input(tmp_path: Path, radiograph) -> None:  # type: ignore[no-untyped-def]
    path = write_radiograph(
        radiograph.pixels, radiograph.pixel_mm, tmp_path, photometric="MONOCHROME1", mirrored=True
    )
    served, volume, _ = prepare_input("cxr_triage", [path])
    trained = preprocess_radiograph(radiograph.pixels, radiograph.pixel_mm)
    assert served.shape == CXR_INPUT_SHAPE and served.dtype == np.float32
    np.testing.assert_allclose(served, trained, atol=1e-6)
    assert volume.n_instances == 1


def test_preprocessing_shape_range_and_aspect() -> None:
    rng = np.random.default_rng(62)
    for shape in ((400, 300), (300, 400), (2000, 2400), (100, 120)):
        r = chest_radiograph_phantom(rng, pneumothorax=False, shape=shape)
        x = preprocess_radiograph(r.pixels, r.pixel_mm)
        assert x.shape == CXR_INPUT_SHAPE and x.min() >= 0.0 and x.max() <= 1.0
    # A tall image is padded left and right, not stretched: the outer columns are empty.
    r = chest_radiograph_phantom(rng, pneumothorax=False, shape=(400, 200))
    x = preprocess_radiograph(r.pixels, r.pixel_mm)
    assert x[0, :, :20].max() == 0.0 and x[0, :, -20:].max() == 0.0


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2D"):
        preprocess_radiograph(np.zeros((3, 40, 40)), (1, 1))
    with pytest.raises(ValueError, match="pixel_mm is required"):
        preprocess_radiograph(np.zeros((40, 40)))
    with pytest.raises(ValueError, match="positive"):
        preprocess_radiograph(np.zeros((40, 40)), (0, 1))
    with pytest.raises(VolumeError, match="no instances"):
        load_radiograph([])
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom")
    with pytest.raises(VolumeError, match="not a readable DICOM"):
        load_radiograph([bad])


def test_the_pneumothorax_mask_follows_the_image() -> None:
    from processors.preprocessing import preprocess_radiograph_with_mask

    r = chest_radiograph_phantom(
        np.random.default_rng(63), pneumothorax=True, side="left", min_rim_fraction=0.2
    )
    assert r.mask is not None
    x, mask = preprocess_radiograph_with_mask(r.pixels, r.pixel_mm, r.mask)
    np.testing.assert_array_equal(x, preprocess_radiograph(r.pixels, r.pixel_mm))
    assert mask.shape == CXR_INPUT_SHAPE[1:] and mask.max() > 0.5
    cols = np.nonzero(mask > 0.5)[1]
    assert cols.mean() > CXR_INPUT_SHAPE[2] / 2  # the patient's left is on the right
    # Pleural air is dark: darker than the body around it.
    body = x[0] > 0.3
    assert np.median(x[0][mask > 0.5]) < np.median(x[0][body])
