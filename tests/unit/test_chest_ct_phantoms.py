"""Chest CT phantoms: seeded, in real HU, with nodule ground truth that survives DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.dicom_writer import write_ct_series
from models.nodule_detector.phantoms import (
    GROUND_GLASS_DIAMETER_MM,
    GROUND_GLASS_HU,
    NOISE_SD_HU,
    SLICE_MM,
    SOLID_DIAMETER_MM,
    SOLID_HU,
    ChestCtPhantom,
    chest_ct_phantom,
    lps_of_index,
)
from processors.dicom_volume import centred_affine, load_series


@pytest.fixture(scope="module")
def phantom() -> ChestCtPhantom:
    return chest_ct_phantom(np.random.default_rng(21), nodules=3, kinds=("solid", "ground_glass", "solid"))


def test_seeded_and_labelled(phantom: ChestCtPhantom) -> None:
    again = chest_ct_phantom(np.random.default_rng(21), nodules=3, kinds=("solid", "ground_glass", "solid"))
    assert np.array_equal(again.hu, phantom.hu) and again.nodules == phantom.nodules
    assert phantom.hu.dtype == np.int16 and phantom.hu.ndim == 3
    assert [n.kind for n in phantom.nodules] == ["solid", "ground_glass", "solid"]
    assert sorted(np.unique(phantom.labels).tolist()) == [0, 1, 2, 3]
    for n in phantom.nodules:
        assert phantom.mask(n).sum() > 0 and n.site in ("parenchymal", "juxta_pleural", "juxta_vascular")
    assert phantom.mask().sum() == sum(int(phantom.mask(n).sum()) for n in phantom.nodules)
    empty = chest_ct_phantom(np.random.default_rng(5), nodules=0)
    assert not empty.has_nodule and not empty.mask().any()


def test_acquisition_ranges() -> None:
    for seed in range(3):
        ph = chest_ct_phantom(np.random.default_rng(100 + seed), nodules=1)
        dz, dy, dx = ph.spacing_zyx
        assert SLICE_MM[0] <= dz <= SLICE_MM[1] and 1.0 <= dy == dx <= 1.5
        assert NOISE_SD_HU[0] <= ph.noise_sd <= NOISE_SD_HU[1]
        assert ph.hu.shape[1:] == (256, 256) and ph.hu.shape[0] * dz >= 200


def test_tissues_are_in_real_hu(phantom: ChestCtPhantom) -> None:
    hu = phantom.hu.astype(np.float32)
    sd = phantom.noise_sd
    middle = hu[hu.shape[0] // 2]
    # Air outside, lung parenchyma, fat, soft tissue and bone are all present at their HU.
    assert np.median(middle[:4, :4]) < -950
    lung = hu[(hu < -700) & (hu > -950)]
    assert -900 < float(np.median(lung)) < -790
    assert ((middle > -130) & (middle < -70)).mean() > 0.01  # subcutaneous fat
    assert ((middle > 25) & (middle < 70)).mean() > 0.1  # muscle, mediastinum, heart
    assert hu.max() > 600 and np.percentile(hu, 99.99) < 1300 + 4 * sd  # ribs, spine
    for n in phantom.nodules:
        lo, hi = SOLID_HU if n.kind == "solid" else GROUND_GLASS_HU
        assert lo <= n.hu <= hi
        dlo, dhi = SOLID_DIAMETER_MM if n.kind == "solid" else GROUND_GLASS_DIAMETER_MM
        assert dlo * 0.8 <= n.diameter_mm <= dhi * 1.2
        core = hu[phantom.mask(n)]
        assert abs(float(np.median(core)) - n.hu) < 150, (n, np.median(core))


def test_vessels_run_through_the_lungs_thinning_to_the_periphery() -> None:
    ph = chest_ct_phantom(np.random.default_rng(8), nodules=0)
    hu = ph.hu
    lungs = (hu < -700) & (hu > -950)
    blood = (hu > -150) & (hu < 150)
    # Blood-density voxels with lung 2 pixels to either side in x or in y: vessels inside the lung.
    inside = blood & (
        (np.roll(lungs, 2, axis=2) & np.roll(lungs, -2, axis=2))
        | (np.roll(lungs, 2, axis=1) & np.roll(lungs, -2, axis=1))
    )
    assert inside.sum() > 1000
    # Thin ones too, at partial volume (a 1 mm vessel fills part of a 1.3 mm pixel): denser than
    # lung by far, with lung right next to them on both sides.
    thin = (hu > -600) & (hu < 150) & np.roll(lungs, 1, axis=2) & np.roll(lungs, -1, axis=2)
    assert thin.sum() > 200


def test_centres_survive_dicom_and_the_volume_affine(phantom: ChestCtPhantom, tmp_path: Path) -> None:
    files = write_ct_series(
        phantom.hu,
        phantom.spacing_zyx,
        tmp_path / "chest",
        body_part="CHEST",
        series_description="CT CHEST WO CONTRAST",
        shuffle_files=True,
        rng=np.random.default_rng(1),
    )
    volume = load_series(files)
    assert volume.affine is not None
    assert np.allclose(volume.affine, centred_affine(phantom.hu.shape, phantom.spacing_zyx), atol=1e-3)
    for n in phantom.nodules:
        index = np.asarray(n.centre_zyx_mm) / np.asarray(phantom.spacing_zyx)
        assert np.allclose(volume.to_patient(index), n.centre_lps_mm, atol=1e-3)
        assert np.allclose(lps_of_index(index, phantom.hu.shape, phantom.spacing_zyx), n.centre_lps_mm)
        k, j, i = np.round(index).astype(int)
        assert phantom.labels[k, j, i] == n.label  # the centre is inside its own nodule
    # First slice in hu order is the most caudal: ImagePositionPatient z grows with the index.
    assert volume.to_patient([1, 0, 0])[2] - volume.to_patient([0, 0, 0])[2] == pytest.approx(
        phantom.spacing_zyx[0], abs=1e-3
    )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="0-3 nodules"):
        chest_ct_phantom(np.random.default_rng(0), nodules=4)
    with pytest.raises(ValueError, match="kinds"):
        chest_ct_phantom(np.random.default_rng(0), nodules=1, kinds=("calcified",))


def test_min_diameter_raises_the_size_range_only() -> None:
    big = chest_ct_phantom(np.random.default_rng(4), nodules=3, min_diameter_mm=14.0)
    assert all(n.diameter_mm >= 13.0 for n in big.nodules), big.nodules  # voxelised volume, ~1 mm off
    # Without it the same seed draws the same study as before the parameter existed.
    a = chest_ct_phantom(np.random.default_rng(4), nodules=1)
    b = chest_ct_phantom(np.random.default_rng(4), nodules=1, min_diameter_mm=None)
    assert a.nodules == b.nodules and np.array_equal(a.hu, b.hu)
