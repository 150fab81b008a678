"""Coarse ICH localisation: model map cells → series slices → the finding's slice range."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread

from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from processors.localisation import (
    CELL_THRESHOLD,
    LOCALISATION_OUTPUT,
    SeriesGeometry,
    SliceCrop,
    affected_cells,
    cells_to_slices,
    localise,
    slice_profile,
    slice_range,
)
from processors.model_inputs import prepare_input
from processors.preprocessing import preprocess_head_ct, preprocess_head_ct_with_crop
from processors.triton_client import read_maps
from radtriage.settings import REPO_ROOT

MODEL_DIR = REPO_ROOT / "deploy" / "triton" / "model_repository" / "ich_classifier"
METRICS = json.loads((REPO_ROOT / "models" / "ich_classifier" / "metrics.json").read_text())


def geometry(n: int, crop: SliceCrop, numbers: tuple[int | None, ...] | None = None) -> SeriesGeometry:
    return SeriesGeometry(crop, tuple(-50.0 + 5.0 * k for k in range(n)), numbers or tuple(range(1, n + 1)))


# --- map cells to series slices ------------------------------------------------------------


def test_cells_divide_the_crop_evenly_when_they_fit() -> None:
    crop = SliceCrop(0, 32, 32)
    assert [cells_to_slices(j, j, 16, crop) for j in (0, 1, 15)] == [(0, 1), (2, 3), (30, 31)]
    assert cells_to_slices(3, 5, 16, crop) == (6, 11)


def test_cells_cover_the_whole_crop_and_only_it() -> None:
    """Any crop and slice count: every series slice of the crop is in some cell's range, none
    outside it, neighbours touch or share a slice, and ranges grow with the cells."""
    for start, stop in ((0, 25), (5, 39), (3, 60), (0, 200), (7, 11)):
        crop = SliceCrop(start, stop, 32)
        ranges = [cells_to_slices(j, j, 16, crop) for j in range(16)]
        covered = set().union(*(range(a, b + 1) for a, b in ranges))
        assert covered == set(range(start, stop)), (start, stop)
        for (a0, b0), (a1, b1) in itertools.pairwise(ranges):
            assert a0 <= a1 and b0 <= b1 and a1 <= b0 + 1
        assert cells_to_slices(0, 15, 16, crop) == (start, stop - 1)


def test_cells_outside_the_map_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        cells_to_slices(3, 16, 16, SliceCrop(0, 32, 32))
    with pytest.raises(ValueError, match="outside"):
        cells_to_slices(4, 3, 16, SliceCrop(0, 32, 32))
    with pytest.raises(ValueError, match="crop"):
        SliceCrop(5, 5, 32)
    with pytest.raises(ValueError, match="past"):
        geometry(10, SliceCrop(0, 12, 32))


def test_profile_and_affected_cells() -> None:
    m = np.zeros((16, 24, 24), np.float32)
    m[4, 3, 7], m[6, 20, 20], m[9, 0, 0] = 0.9, 0.7, 0.3
    profile = slice_profile(m[None])  # the batch axis of 1 is accepted
    assert profile.shape == (16,) and profile[4] == pytest.approx(0.9)
    assert affected_cells(profile, 0.5) == (4, 6)  # first to last at or above, gaps included
    assert affected_cells(profile, 0.95) == (4, 4)  # nothing reaches it: the peak alone
    with pytest.raises(ValueError, match="map"):
        slice_profile(np.zeros((16, 24)))


def test_slice_range_states_instance_numbers_and_positions() -> None:
    # Instance numbers counted down the series (a sender's choice): first is still the lowest slice.
    g = geometry(20, SliceCrop(0, 20, 32), tuple(range(20, 0, -1)))
    r = slice_range(4, 7, g)
    assert (r.first_instance_number, r.last_instance_number) == (16, 13)
    assert (r.first_position_mm, r.last_position_mm, r.slices) == (-30.0, -15.0, 4)
    unnumbered = slice_range(4, 7, geometry(20, SliceCrop(0, 20, 32), (None,) * 20))
    assert unnumbered.first_instance_number is None and unnumbered.last_instance_number is None


def test_localise_only_positive_findings_with_a_map_and_a_geometry() -> None:
    m = np.zeros((1, 16, 24, 24), np.float32)
    m[0, 8, 10, 10] = 0.99
    g = geometry(40, SliceCrop(4, 36, 32))  # 32 slices cropped: 2 a cell
    r = localise({LOCALISATION_OUTPUT: m}, g, positive=True)
    assert r is not None and (r.first_instance_number, r.last_instance_number) == (21, 22)
    assert localise({LOCALISATION_OUTPUT: m}, g, positive=False) is None
    assert localise({}, g, positive=True) is None
    assert localise({LOCALISATION_OUTPUT: m}, None, positive=True) is None
    # A positive study whose map stays dim still gets its strongest slab.
    dim = np.full((16, 24, 24), 0.01, np.float32)
    dim[2] = 0.2
    r = localise({LOCALISATION_OUTPUT: dim}, g, positive=True)
    assert r is not None and (r.first_instance_number, r.last_instance_number, r.slices) == (9, 10, 2)


def test_a_rules_own_cell_threshold_replaces_the_reference_one() -> None:
    m = np.zeros((16, 24, 24), np.float32)
    m[4, 3, 3], m[5, 3, 3], m[6, 3, 3] = 0.5, 0.9, 0.5  # cells 4-6; only 5 reaches 0.75
    g = geometry(40, SliceCrop(4, 36, 32))
    default = localise({LOCALISATION_OUTPUT: m}, g, positive=True)
    lower = localise({LOCALISATION_OUTPUT: m}, g, positive=True, threshold=0.4)
    assert default is not None and lower is not None
    assert default.slices == 2 and lower.slices == 6


def test_read_maps_keeps_finite_multi_value_outputs_without_the_batch_axis() -> None:
    good = np.random.default_rng(0).random((1, 16, 24, 24)).astype(np.float32)
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    maps = read_maps(
        {
            "probability": np.array([[0.9]], np.float32),
            "side_left_probability": np.array([[0.2]], np.float32),
            LOCALISATION_OUTPUT: good,
            "broken_map": bad,
            "labels": np.array([[b"a", b"b"]], dtype=object),
            "absent": None,
        }
    )
    assert set(maps) == {LOCALISATION_OUTPUT}
    assert maps[LOCALISATION_OUTPUT].shape == (16, 24, 24)


# --- the crop, the loaded series' geometry, the committed weights --------------------------


def test_the_cropping_preprocessing_is_the_same_tensor_and_names_the_head_slices() -> None:
    ph = head_ct_phantom(np.random.default_rng(31), bleed=True)
    air = np.full((6, *ph.hu.shape[1:]), -1000, ph.hu.dtype)
    hu = np.concatenate([air, ph.hu, air[:3]])  # air below and above the head: cropped away
    x, crop = preprocess_head_ct_with_crop(hu, ph.spacing_zyx)
    np.testing.assert_array_equal(x, preprocess_head_ct(hu, ph.spacing_zyx))
    assert crop.depth == 32 and 4 <= crop.start <= 6 and hu.shape[0] - 3 <= crop.stop + 2
    assert crop.stop <= hu.shape[0]


def test_a_shuffled_dicom_series_maps_back_to_its_own_instance_numbers(tmp_path: Path) -> None:
    ph = head_ct_phantom(np.random.default_rng(32), bleed=True)
    files = write_ct_series(ph.hu, ph.spacing_zyx, tmp_path, shuffle_files=True, rng=np.random.default_rng(1))
    tensor, volume, g = prepare_input("ich_classifier", files)
    np.testing.assert_array_equal(tensor, preprocess_head_ct(volume))
    assert g is not None and volume.positions_mm == g.positions_mm
    by_number = {int(ds.InstanceNumber): float(ds.ImagePositionPatient[2]) for ds in map(dcmread, files)}
    assert sorted(g.positions_mm) == list(g.positions_mm)
    for number, z in zip(g.instance_numbers, g.positions_mm, strict=True):
        assert number is not None and by_number[number] == pytest.approx(z, abs=1e-3)


def test_the_committed_weights_put_the_range_on_the_bleed(tmp_path: Path) -> None:
    """Through DICOM (shuffled instance numbers), the served model's map and `localise`: the
    reported images hold blood for most fresh bleeds (models/ich_classifier/localisation_eval.py measures
    the share on 200 held-out phantoms)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(MODEL_DIR / "1" / "model.pt"), map_location="cpu").eval()
    rng = np.random.default_rng(515_151)  # no training, validation or test seed
    hits = 0
    for i in range(4):
        ph = head_ct_phantom(rng, bleed=True, min_bleed_ml=1.0)
        assert ph.blood_mask is not None
        files = write_ct_series(ph.hu, ph.spacing_zyx, tmp_path / str(i), shuffle_files=True, rng=rng)
        tensor, _volume, g = prepare_input("ich_classifier", files)
        with torch.no_grad():
            _prob, cell_map = model(torch.from_numpy(tensor)[None])
        r = localise({LOCALISATION_OUTPUT: cell_map.numpy()}, g, positive=True)
        assert r is not None and r.first_instance_number is not None and r.last_instance_number is not None
        # The instance numbers of the slices with blood, read back from the files.
        z_of = {int(ds.InstanceNumber): float(ds.ImagePositionPatient[2]) for ds in map(dcmread, files)}
        positions = sorted(z_of.values())
        blood_z = {positions[k] for k in np.flatnonzero(ph.blood_mask.any(axis=(1, 2)))}
        in_range = {z for z in z_of.values() if r.first_position_mm - 1e-3 <= z <= r.last_position_mm + 1e-3}
        assert {z_of[r.first_instance_number], z_of[r.last_instance_number]} <= in_range
        hits += bool(in_range & blood_z)
    assert hits >= 3


def test_the_cell_threshold_is_the_one_the_evaluation_chose() -> None:
    loc = METRICS["localisation"]
    assert loc["cell_threshold"] == CELL_THRESHOLD and loc["output"] == LOCALISATION_OUTPUT
    assert loc["test_bleeds"] >= 200 and loc["overlap_fraction"] >= 0.8
