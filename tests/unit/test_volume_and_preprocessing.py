from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

from models.dicom_writer import write_ct_series
from models.phantoms import chest_ct_phantom, head_ct_phantom
from processors.dicom_volume import VolumeError, load_series
from processors.preprocessing import ICH_INPUT_SHAPE, preprocess_head_ct


@pytest.fixture
def series(tmp_path: Path) -> tuple[np.ndarray, list[Path]]:
    ph = head_ct_phantom(np.random.default_rng(3), bleed=True)
    files = write_ct_series(
        ph.hu, ph.spacing_zyx, tmp_path / "s", shuffle_files=True, rng=np.random.default_rng(4)
    )
    return ph.hu, files


def test_round_trip_is_exact_and_ordered_by_position(series: tuple[np.ndarray, list[Path]]) -> None:
    hu, files = series
    # Files are shuffled relative to position: InstanceNumber order is not slice order.
    numbers_by_z = [
        int(dcmread(f).InstanceNumber)
        for f in sorted(files, key=lambda f: float(dcmread(f).ImagePositionPatient[2]))
    ]
    assert numbers_by_z != sorted(numbers_by_z)
    vol = load_series(list(reversed(files)))
    expected = np.round(hu + 1024) - 1024  # stored with intercept -1024, slope 1
    np.testing.assert_array_equal(vol.hu, expected)
    assert vol.n_instances == hu.shape[0]
    assert vol.spacing_zyx[0] == pytest.approx(float(dcmread(files[0]).SliceThickness))


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    ph = chest_ct_phantom(np.random.default_rng(9))
    files = write_ct_series(ph.hu, ph.spacing_zyx, tmp_path, rescale_slope=2.0, rescale_intercept=-2048.0)
    vol = load_series(files)
    np.testing.assert_allclose(vol.hu, np.round((ph.hu + 2048) / 2) * 2 - 2048)


def test_phantom_ground_truth() -> None:
    rng = np.random.default_rng(11)
    bleed = head_ct_phantom(rng, bleed=True)
    normal = head_ct_phantom(rng, bleed=False)
    assert bleed.has_bleed and bleed.bleeds and bleed.bleed_slices is not None
    assert not normal.has_bleed and normal.bleed_slices is None
    # Acute blood is hyperdense: brighter than any parenchyma of the normal head.
    brainish = normal.hu[(normal.hu > 0) & (normal.hu < 100)]
    assert np.percentile(brainish, 50) < 45
    assert normal.hu.min() >= -1024 and normal.hu.max() > 600  # air and skull in HU


def _write(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_load_errors_say_what_is_wrong(series: tuple[np.ndarray, list[Path]], tmp_path: Path) -> None:
    _, files = series
    with pytest.raises(VolumeError, match="no instances"):
        load_series([])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM at all" * 10)
    with pytest.raises(VolumeError, match="not a readable DICOM"):
        load_series([*files, junk])
    sr = Dataset()
    sr.SOPClassUID = BasicTextSRStorage
    sr.SOPInstanceUID = generate_uid()
    sr.SeriesInstanceUID = dcmread(files[0]).SeriesInstanceUID
    sr.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    with pytest.raises(VolumeError, match="no pixel data"):
        load_series([*files, _write(sr, tmp_path / "sr.dcm")])
    other = head_ct_phantom(np.random.default_rng(5), bleed=False)
    other_files = write_ct_series(other.hu, other.spacing_zyx, tmp_path / "other")
    with pytest.raises(VolumeError, match="2 series"):
        load_series([*files, other_files[0]])
    ds = dcmread(files[0])
    del ds.ImagePositionPatient
    ds.save_as(tmp_path / "noipp.dcm")
    with pytest.raises(VolumeError, match="ImagePositionPatient"):
        load_series([*files[1:], tmp_path / "noipp.dcm"])
    with pytest.raises(VolumeError, match="share one slice position"):
        dup = dcmread(files[1])
        dup.SOPInstanceUID = generate_uid()
        dup.ImagePositionPatient = dcmread(files[0]).ImagePositionPatient
        dup.save_as(tmp_path / "dup.dcm")
        load_series([*files, tmp_path / "dup.dcm"])


def test_preprocessing_shape_range_and_blood_contrast() -> None:
    ph = head_ct_phantom(np.random.default_rng(21), bleed=True)
    x = preprocess_head_ct(ph.hu, ph.spacing_zyx)
    assert x.shape == ICH_INPUT_SHAPE and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # Blood (55-90 HU) must map above parenchyma (25-40 HU) after windowing.
    from processors.preprocessing import ICH_WINDOW_HU

    lo, hi = ICH_WINDOW_HU
    assert (60 - lo) / (hi - lo) > (40 - lo) / (hi - lo) + 0.1
    with pytest.raises(ValueError, match="3D"):
        preprocess_head_ct(np.zeros((10, 10)), (1, 1, 1))
