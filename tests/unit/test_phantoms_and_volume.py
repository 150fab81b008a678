"""Phantoms → DICOM series → volume: the pixels survive the round trip, in position order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from models.dicom_writer import write_ct_series
from models.phantoms import Phantom, chest_ct_phantom, head_ct_phantom
from processors.dicom_volume import VolumeError, load_series


@pytest.fixture(scope="module")
def bleed_phantom() -> Phantom:
    return head_ct_phantom(np.random.default_rng(3), bleed=True)


@pytest.fixture
def series(bleed_phantom: Phantom, tmp_path: Path) -> list[Path]:
    return write_ct_series(
        bleed_phantom.hu,
        bleed_phantom.spacing_zyx,
        tmp_path / "s",
        accession="ACC42",
        patient_id="P42",
        shuffle_files=True,
        rng=np.random.default_rng(4),
    )


# --- phantoms -----------------------------------------------------------------------------


def test_phantoms_are_seeded_and_carry_ground_truth() -> None:
    a = head_ct_phantom(np.random.default_rng(11), bleed=True)
    b = head_ct_phantom(np.random.default_rng(11), bleed=True)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.has_bleed and a.bleeds and a.bleed_slices is not None and a.bleed_volume_ml > 0
    assert a.blood_mask is not None and a.blood_mask.shape == a.hu.shape
    lo, hi = a.bleed_slices
    assert a.blood_mask[lo].any() and a.blood_mask[hi].any() and not a.blood_mask[hi + 1 :].any()
    normal = head_ct_phantom(np.random.default_rng(12), bleed=False)
    assert not normal.has_bleed and normal.bleed_slices is None and normal.bleeds == ()


def test_head_phantom_is_in_hounsfield_units() -> None:
    ph = head_ct_phantom(np.random.default_rng(13), bleed=True, min_bleed_ml=3.0)
    hu = ph.hu.astype(np.float32)
    assert ph.hu.dtype == np.int16 and hu.ndim == 3
    assert 24 <= hu.shape[0] <= 40 and hu.shape[1:] == (128, 128)
    assert np.median(hu[0:2, 0:4, 0:4]) < -950  # air in the corners
    assert hu.max() > 600  # skull
    assert ph.blood_mask is not None
    blood = hu[ph.blood_mask]
    # Acute blood is hyperdense against parenchyma (which sits around 20-45 HU).
    brain = hu[(hu > 15) & (hu < 50) & ~ph.blood_mask]
    assert 50 < np.median(blood) < 95
    assert np.median(brain) < 45 and np.median(blood) > np.median(brain) + 10
    assert ph.bleed_volume_ml >= 3.0


def test_bleed_sizes_vary_and_include_small_ones() -> None:
    rng = np.random.default_rng(14)
    volumes = [head_ct_phantom(rng, bleed=True).bleed_volume_ml for _ in range(16)]
    assert min(volumes) < 2.0 and max(volumes) > 8.0


def test_chest_phantom_has_lungs_and_bone() -> None:
    ph = chest_ct_phantom(np.random.default_rng(15))
    hu = ph.hu.astype(np.float32)
    assert not ph.has_bleed
    assert ((hu > -900) & (hu < -750)).mean() > 0.05  # aerated lung
    assert hu.max() > 700


# --- writer and loader round trip ------------------------------------------------------------


def test_round_trip_is_exact_and_ordered_by_position(bleed_phantom: Phantom, series: list[Path]) -> None:
    datasets = [dcmread(f) for f in series]
    # InstanceNumber order is deliberately not slice order.
    numbers_by_z = [
        int(ds.InstanceNumber) for ds in sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    ]
    assert numbers_by_z != sorted(numbers_by_z)
    vol = load_series(list(reversed(series)))
    # Integer HU with slope 1 / intercept -1024: exact.
    np.testing.assert_array_equal(vol.hu, bleed_phantom.hu.astype(np.float32))
    assert vol.hu.dtype == np.float32 and vol.n_instances == bleed_phantom.hu.shape[0]
    assert vol.spacing_zyx == pytest.approx(bleed_phantom.spacing_zyx, abs=1e-3)
    assert vol.study_uid == datasets[0].StudyInstanceUID and vol.series_uid == datasets[0].SeriesInstanceUID


def test_written_files_are_ct_image_storage(series: list[Path]) -> None:
    ds = dcmread(series[0])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
    assert ds.BodyPartExamined == "HEAD" and ds.AccessionNumber == "ACC42" and ds.PatientID == "P42"
    assert ds.BitsAllocated == 16 and ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1
    # One frame of reference and one study for the whole series.
    assert len({dcmread(f).FrameOfReferenceUID for f in series}) == 1


def test_rescale_slope_intercept_and_signed_pixels(tmp_path: Path) -> None:
    ph = chest_ct_phantom(np.random.default_rng(9))
    files = write_ct_series(
        ph.hu, ph.spacing_zyx, tmp_path / "a", rescale_slope=2.0, rescale_intercept=-2048.0
    )
    vol = load_series(files)
    expected = np.round((ph.hu.astype(np.float64) + 2048) / 2) * 2 - 2048
    np.testing.assert_allclose(vol.hu, expected)
    # Intercept 0: air is negative, so pixels must be stored signed.
    files = write_ct_series(ph.hu, ph.spacing_zyx, tmp_path / "b", rescale_intercept=0.0)
    assert dcmread(files[0]).PixelRepresentation == 1
    np.testing.assert_array_equal(load_series(files).hu, ph.hu.astype(np.float32))


def test_reversed_normal_reverses_the_order(
    bleed_phantom: Phantom, series: list[Path], tmp_path: Path
) -> None:
    # Same slices, stack direction reversed (normal = -z) via a flipped column direction:
    # sorting by the projection on the normal must then reverse the order too.
    flipped = []
    for f in series:
        ds = dcmread(f)
        ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
        out = tmp_path / f"flip_{f.name}"
        ds.save_as(out)
        flipped.append(out)
    vol = load_series(flipped)
    np.testing.assert_array_equal(vol.hu, bleed_phantom.hu[::-1].astype(np.float32))


# --- loader errors ---------------------------------------------------------------------------


def _save(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_no_instances() -> None:
    with pytest.raises(VolumeError, match="no instances"):
        load_series([])


def test_non_image_dicom(series: list[Path], tmp_path: Path) -> None:
    sr = Dataset()
    sr.SOPClassUID = BasicTextSRStorage
    sr.SOPInstanceUID = generate_uid()
    sr.SeriesInstanceUID = dcmread(series[0]).SeriesInstanceUID
    with pytest.raises(VolumeError, match="no pixel data"):
        load_series([*series, _save(sr, tmp_path / "sr.dcm")])


def test_corrupt_files(series: list[Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM at all" * 10)
    with pytest.raises(VolumeError, match=r"junk\.dcm: not a readable DICOM"):
        load_series([*series, junk])
    # A real header whose pixel data was cut off in transfer.
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(series[0].read_bytes()[:-5000])
    with pytest.raises(VolumeError, match=r"truncated\.dcm"):
        load_series([*series[1:], truncated])
    with pytest.raises(VolumeError, match="not a readable DICOM"):
        load_series([tmp_path / "does-not-exist.dcm"])


def test_mixed_series(series: list[Path], tmp_path: Path) -> None:
    other = head_ct_phantom(np.random.default_rng(5), bleed=False)
    other_files = write_ct_series(other.hu, other.spacing_zyx, tmp_path / "other")
    with pytest.raises(VolumeError, match="2 series"):
        load_series([*series, other_files[0]])


def test_missing_and_inconsistent_geometry(series: list[Path], tmp_path: Path) -> None:
    ds = dcmread(series[0])
    del ds.ImagePositionPatient
    ds.save_as(tmp_path / "noipp.dcm")
    with pytest.raises(VolumeError, match="no ImagePositionPatient"):
        load_series([*series[1:], tmp_path / "noipp.dcm"])

    ds = dcmread(series[0])
    del ds.ImageOrientationPatient
    ds.save_as(tmp_path / "noiop.dcm")
    with pytest.raises(VolumeError, match="ImageOrientationPatient"):
        load_series([tmp_path / "noiop.dcm", *series[1:]])

    ds = dcmread(series[0])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(tmp_path / "sagittal.dcm")
    with pytest.raises(VolumeError, match="orientation differs"):
        load_series([*series[1:], tmp_path / "sagittal.dcm"])


def test_mixed_sizes(series: list[Path], tmp_path: Path) -> None:
    ds = dcmread(series[0])
    small = ds.pixel_array[:64, :64].copy()
    ds.Rows, ds.Columns = 64, 64
    ds.PixelData = small.tobytes()
    ds.save_as(tmp_path / "small.dcm")
    with pytest.raises(VolumeError, match="mixed sizes"):
        load_series([*series[1:], tmp_path / "small.dcm"])


def test_duplicate_positions_and_missing_slices(series: list[Path], tmp_path: Path) -> None:
    by_z = sorted(series, key=lambda f: float(dcmread(f).ImagePositionPatient[2]))
    dup = dcmread(by_z[1])
    dup.SOPInstanceUID = generate_uid()
    dup.ImagePositionPatient = dcmread(by_z[0]).ImagePositionPatient
    dup.save_as(tmp_path / "dup.dcm")
    with pytest.raises(VolumeError, match="share one slice position"):
        load_series([*series, tmp_path / "dup.dcm"])
    middle = len(by_z) // 2
    with pytest.raises(VolumeError, match="slices are missing"):
        load_series(by_z[:middle] + by_z[middle + 1 :])
