"""Phantoms → DICOM series → volume: the pixels survive the round trip, in position order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import BasicTextSRStorage, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from models.dicom_writer import write_ct_series
from models.phantoms import Phantom, chest_ct_phantom, head_ct_phantom
from processors.dicom_volume import VolumeError, load_series
from tests.support.dicom_objects import with_meta


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
    with_meta(ds).save_as(path, enforce_file_format=True)
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


# --- reading onto a model's working grid (issue 16) ------------------------------------------


def _reference_hu(files: list[Path]) -> np.ndarray:
    """The loader before issue 16, independently: every file read whole, each slice to float32
    with its own rescale, stacked in position order. What the models were trained through."""
    datasets = sorted((dcmread(f) for f in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack(
        [
            ds.pixel_array.astype(np.float32) * np.float32(float(ds.RescaleSlope))
            + np.float32(float(ds.RescaleIntercept))
            for ds in datasets
        ]
    )


def test_phantom_sized_series_load_bit_identical_on_every_ct_models_path(
    bleed_phantom: Phantom, series: list[Path], tmp_path: Path
) -> None:
    """Training phantoms are at or below every working grid: the models' loaders read them at
    full resolution, bit for bit what the old loader gave, so trained weights and
    models/EVALUATION.md are unaffected by the pooling."""
    from models.lvo_detector.phantoms import cta_phantom
    from models.nodule_detector.phantoms import chest_ct_phantom as nodule_phantom
    from processors.model_inputs import model_input

    cta = cta_phantom(np.random.default_rng(21), lvo=True)
    chest = nodule_phantom(np.random.default_rng(22), nodules=1)
    cases = {
        "ich_classifier": series,
        "lvo_detector": write_ct_series(cta.hu, cta.spacing_zyx, tmp_path / "cta"),
        "nodule_detector": write_ct_series(chest.hu, chest.spacing_zyx, tmp_path / "chest"),
    }
    for model, files in cases.items():
        volume = model_input(model).load(files)
        assert volume.pool_zyx == (1, 1, 1), model
        np.testing.assert_array_equal(volume.hu, _reference_hu(files), err_msg=model)
        assert volume.hu.dtype == np.float32 and volume.hu.flags.c_contiguous
        assert volume.source_positions_mm == () and len(volume.positions_mm) == len(files)


def _thin_series(tmp_path: Path, n: int = 13) -> tuple[list[Path], np.ndarray]:
    """A small series whose slices carry different RescaleSlope/Intercept (scanners may vary
    them per slice), shuffled instance numbers, and a size no pooling factor divides."""
    rng = np.random.default_rng(31)
    hu = rng.integers(-1000, 1500, size=(n, 11, 14)).astype(np.int16)
    files = write_ct_series(hu, (0.625, 0.5, 0.45), tmp_path / "thin", shuffle_files=True, rng=rng)
    for i, f in enumerate(files):
        ds = dcmread(f)
        slope, intercept = (1.0, -1024.0) if i % 3 else (0.5, -1000.0)
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.save_as(f)
    return files, _reference_hu(files)


def test_pooled_load_is_the_block_average_with_its_geometry(tmp_path: Path) -> None:
    files, full = _thin_series(tmp_path)
    reference = load_series(files)
    np.testing.assert_array_equal(reference.hu, full)
    vol = load_series(files, pool=lambda shape, spacing: (3, 2, 3))

    # Blocks of 3 slices x 2 rows x 3 columns; the rows and columns past the last whole block
    # are dropped, the last z group (13 = 4 x 3 + 1) averages what it has.
    f64 = full.astype(np.float64)[:, :10, :12]
    expected = np.stack(
        [f64[z : z + 3].reshape(-1, 5, 2, 4, 3).mean(axis=(0, 2, 4)) for z in range(0, 13, 3)]
    )
    assert vol.hu.shape == (5, 5, 4) and vol.hu.dtype == np.float32
    np.testing.assert_allclose(vol.hu, expected, rtol=0, atol=1e-3)
    assert vol.pool_zyx == (3, 2, 3)
    assert vol.spacing_zyx == pytest.approx((0.625 * 3, 0.5 * 2, 0.45 * 3), abs=1e-6)

    # The affine puts pooled voxel (0, 0, 0) at the centre of the series voxels it averages.
    assert reference.affine is not None and vol.affine is not None
    corners = reference.to_patient(np.array([[0, 0, 0], [2, 1, 2]], dtype=float))
    np.testing.assert_allclose(vol.to_patient([0, 0, 0]), corners.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(vol.to_patient([1, 2, 1]), reference.to_patient([4, 4.5, 4]), atol=1e-6)

    # Per pooled slice: its mean position; no instance number of its own; the series' own
    # tables are kept whole, and each pooled slice knows which series slices it holds.
    np.testing.assert_allclose(vol.positions_mm[0], np.mean(reference.positions_mm[:3]), atol=1e-6)
    assert vol.positions_mm[-1] == pytest.approx(reference.positions_mm[12])
    assert vol.instance_numbers == (None,) * 5
    assert vol.series_positions_mm == reference.positions_mm
    assert vol.series_instance_numbers == reference.instance_numbers
    assert vol.series_slices(1, 3) == (3, 9) and vol.series_slices(4, 5) == (12, 13)


def test_in_plane_pooling_only_keeps_the_series_slices(tmp_path: Path) -> None:
    files, full = _thin_series(tmp_path)
    vol = load_series(files, pool=lambda shape, spacing: (1, 1, 2))
    np.testing.assert_allclose(
        vol.hu, full[:, :, :14].reshape(13, 11, 7, 2).astype(np.float64).mean(axis=3), atol=1e-3
    )
    reference = load_series(files)
    assert vol.positions_mm == reference.positions_mm and vol.instance_numbers == reference.instance_numbers
    assert vol.source_positions_mm == ()


def test_a_finding_on_a_pooled_series_names_the_series_own_instances(tmp_path: Path) -> None:
    """Localisation through a z-pooled volume: the slice range is in the series' instance numbers
    and positions (ascending along the normal), covering the series slices the crop averaged."""
    from processors.localisation import SliceCrop, cells_to_slices, slice_range
    from processors.model_inputs import ich_geometry

    files, _ = _thin_series(tmp_path)
    reference = load_series(files)
    vol = load_series(files, pool=lambda shape, spacing: (3, 1, 1))
    geometry = ich_geometry(vol, SliceCrop(1, 4, 32))
    assert geometry is not None
    assert geometry.crop == SliceCrop(3, 12, 32)
    assert geometry.positions_mm == reference.positions_mm
    assert list(geometry.positions_mm) == sorted(geometry.positions_mm)
    assert geometry.instance_numbers == reference.instance_numbers
    # The whole map → the crop's series slices, by the instance numbers a viewer shows.
    found = slice_range(*cells_to_slices(0, 15, 16, geometry.crop), geometry)
    by_position = sorted(
        (float(dcmread(f).ImagePositionPatient[2]), int(dcmread(f).InstanceNumber)) for f in files
    )
    assert found.first_instance_number == by_position[3][1]
    assert found.last_instance_number == by_position[11][1]
    assert found.first_position_mm == pytest.approx(by_position[3][0], abs=1e-3)
    assert found.slices == 9


def test_the_working_grids_leave_phantoms_alone_and_pool_a_scanner_series() -> None:
    from processors.preprocessing import ich_pooling, lvo_pooling, nodule_pooling

    assert ich_pooling((40, 128, 128), (4.0, 1.7, 1.7)) == (1, 1, 1)
    # 240 x 512 x 512 -> 60 x 170 x 170: at most twice the model grid (32, 96, 96), at least it.
    assert ich_pooling((240, 512, 512), (0.625, 0.45, 0.45)) == (4, 3, 3)
    assert ich_pooling((120, 512, 512), (1.25, 0.45, 0.45)) == (2, 3, 3)
    assert ich_pooling((64, 192, 192), (2.5, 1.2, 1.2)) == (1, 1, 1)
    assert lvo_pooling((52, 128, 128), (3.0, 1.8, 1.8)) == (1, 1, 1)
    assert lvo_pooling((400, 512, 512), (0.625, 0.45, 0.45)) == (3, 3, 3)
    # Chest: the nodule preprocessing's own 2.5 mm box average, only on long axes.
    assert nodule_pooling((204, 256, 256), (1.25, 1.2, 1.2)) == (1, 1, 1)
    assert nodule_pooling((480, 512, 512), (0.625, 0.7, 0.7)) == (4, 3, 3)
