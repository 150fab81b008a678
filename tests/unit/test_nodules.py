"""Chest CT preprocessing (fixed grid, geometry) and nodules from a map (find_nodules)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from models.nodule_detector.phantoms import ChestCtPhantom, chest_ct_phantom
from processors.dicom_volume import Volume, centred_affine, series_affine
from processors.nodules import NODULE_OUTPUT, NoduleGeometry, find_nodules, nodules_of
from processors.preprocessing import (
    NODULE_GRID_MM,
    NODULE_INPUT_SHAPE,
    preprocess_chest_ct,
    preprocess_chest_ct_with_mask,
)

MAP_SHAPE = NODULE_INPUT_SHAPE[1:]


def _geometry(
    spacing: float = 2.5, origin: tuple[float, float, float] = (-150.0, -90.0, -110.0)
) -> NoduleGeometry:
    a = np.eye(4)
    a[:3, :3] = [[0, 0, spacing], [0, spacing, 0], [spacing, 0, 0]]
    a[:3, 3] = origin
    return NoduleGeometry.from_matrix(a, MAP_SHAPE)


def _sphere(centre_zyx: np.ndarray, diameter_mm: float, voxel_mm: float, shape=MAP_SHAPE, p: float = 1.0):
    """A map holding the fraction of each voxel inside a sphere (8^3 subsamples a voxel)."""
    out = np.zeros(shape, dtype=np.float32)
    r = diameter_mm / 2 / voxel_mm
    lo = np.maximum(np.floor(centre_zyx - r - 1).astype(int), 0)
    hi = np.minimum(np.ceil(centre_zyx + r + 2).astype(int), shape)
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    grid = np.stack(np.meshgrid(sub, sub, sub, indexing="ij"), -1).reshape(-1, 3)
    for k in range(lo[0], hi[0]):
        for j in range(lo[1], hi[1]):
            for i in range(lo[2], hi[2]):
                inside = np.linalg.norm(grid + np.array([k, j, i]) - centre_zyx, axis=1) <= r
                out[k, j, i] = inside.mean() * p
    return out


@pytest.mark.parametrize("diameter", [6.0, 9.0, 14.0, 25.0])
def test_sphere_centre_and_diameter(diameter: float) -> None:
    geometry = _geometry()
    centre = np.array([40.3, 35.6, 70.45])
    m = _sphere(centre, diameter, NODULE_GRID_MM)
    found = find_nodules(m, geometry, 0.5)
    assert len(found) == 1
    (nodule,) = found
    want = geometry.to_patient(centre)
    assert np.linalg.norm(np.subtract(nodule.centre_lps_mm, want)) < 1.5
    assert abs(nodule.diameter_mm - diameter) < 1.0, nodule
    assert nodule.probability == pytest.approx(float(m.max()), abs=1e-4)  # the peak


def test_two_nodules_sorted_by_probability_and_capped() -> None:
    geometry = _geometry()
    m = np.maximum(
        _sphere(np.array([30.0, 30.0, 30.0]), 10.0, 2.5, p=0.7),
        _sphere(np.array([60.0, 50.0, 100.0]), 8.0, 2.5, p=0.95),
    )
    found = find_nodules(m[None, None], geometry, 0.3)
    assert [round(f.probability, 2) for f in found] == [0.95, 0.7]
    assert find_nodules(m, geometry, 0.3, max_nodules=1) == found[:1]
    assert find_nodules(m, geometry, 0.99) == []
    assert find_nodules(np.zeros(MAP_SHAPE, np.float32), geometry, 0.5) == []


def test_geometry_is_picklable_and_invertible() -> None:
    geometry = _geometry(origin=(1.0, 2.0, 3.0))
    assert pickle.loads(pickle.dumps(geometry)) == geometry
    idx = np.array([[1.5, 2.0, 3.25], [90.0, 0.0, 127.0]])
    assert np.allclose(geometry.to_index(geometry.to_patient(idx)), idx)
    assert geometry.voxel_mm == (2.5, 2.5, 2.5) and geometry.voxel_volume_mm3 == pytest.approx(2.5**3)
    assert np.allclose(geometry.to_patient([0, 0, 1]), [3.5, 2.0, 3.0])  # map x is patient x


@pytest.mark.parametrize(
    ("bad_map", "message"),
    [
        (np.zeros((4, 4), np.float32), "nodule map"),
        (np.zeros((2, *MAP_SHAPE), np.float32), "nodule map"),
        (np.zeros((10, 10, 10), np.float32), "differs from the geometry"),
        (np.full(MAP_SHAPE, np.nan, np.float32), "NaN"),
        (np.full(MAP_SHAPE, 3.0, np.float32), "logits"),
        (np.full(MAP_SHAPE, "x"), "real numbers"),
    ],
)
def test_malformed_maps(bad_map: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        find_nodules(bad_map, _geometry(), 0.5)


def test_malformed_geometry_and_threshold() -> None:
    m = np.zeros(MAP_SHAPE, np.float32)
    with pytest.raises(ValueError, match="threshold"):
        find_nodules(m, _geometry(), 0.0)
    with pytest.raises(ValueError, match="threshold"):
        find_nodules(m, _geometry(), 1.5)
    with pytest.raises(ValueError, match="NoduleGeometry"):
        find_nodules(m, np.eye(4), 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="4 x 4"):
        NoduleGeometry(((1.0, 0.0, 0.0),), MAP_SHAPE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invertible"):
        NoduleGeometry.from_matrix(np.zeros((4, 4)), MAP_SHAPE)
    with pytest.raises(ValueError, match="map_shape"):
        NoduleGeometry.from_matrix(np.eye(4), (0, 1, 1))


# --- preprocessing ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom() -> ChestCtPhantom:
    return chest_ct_phantom(np.random.default_rng(31), nodules=2, kinds=("solid", "ground_glass"))


def test_fixed_shape_and_ranges(phantom: ChestCtPhantom) -> None:
    x, geometry = preprocess_chest_ct(phantom.hu.astype(np.float32), phantom.spacing_zyx)
    assert x.shape == NODULE_INPUT_SHAPE and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(x[1]).tolist()) == {0.0, 1.0} and 0.1 < x[1].mean() < 0.6  # lungs
    assert geometry.map_shape == MAP_SHAPE and geometry.voxel_mm == (NODULE_GRID_MM,) * 3


def test_mask_round_trip_puts_nodules_back_where_they_are(phantom: ChestCtPhantom) -> None:
    x, target, geometry = preprocess_chest_ct_with_mask(phantom.hu, phantom.spacing_zyx, phantom.mask())
    assert target.shape == MAP_SHAPE and 0.0 <= target.min() and target.max() <= 1.0
    volume_mm3 = sum(math.pi / 6 * n.diameter_mm**3 for n in phantom.nodules)
    assert target.sum() * NODULE_GRID_MM**3 == pytest.approx(volume_mm3, rel=0.15)
    found = find_nodules(target, geometry, 0.5)
    assert len(found) == 2
    for n in phantom.nodules:
        k, j, i = np.round(geometry.to_index(n.centre_lps_mm)).astype(int)
        assert target[k, j, i] > 0.5 and x[1, k, j, i] == 1.0  # inside the lung region
        best = min(found, key=lambda f: np.linalg.norm(np.subtract(f.centre_lps_mm, n.centre_lps_mm)))
        assert np.linalg.norm(np.subtract(best.centre_lps_mm, n.centre_lps_mm)) < 1.5
        assert abs(best.diameter_mm - n.diameter_mm) < 1.5
    with pytest.raises(ValueError, match="mask shape"):
        preprocess_chest_ct_with_mask(phantom.hu, phantom.spacing_zyx, phantom.mask()[1:])


def test_orientation_is_read_from_the_affine(phantom: ChestCtPhantom) -> None:
    """The same patient stored right-to-left and feet-first gives the same grid and geometry."""
    hu = phantom.hu.astype(np.float32)
    spacing = phantom.spacing_zyx
    straight = Volume(hu, spacing, "1.2", "1.2.3", hu.shape[0], affine=centred_affine(hu.shape, spacing))
    a = centred_affine(hu.shape, spacing)
    # Columns now run to the patient's right, slices go down: the last column/slice is the old first.
    far = a[:3, :3] @ (np.array(hu.shape) - 1) + a[:3, 3]
    start = np.array([far[0], a[1, 3], far[2]])
    # Row direction -x: the normal (row x column) is -z, so slices sorted along it run downwards.
    flipped_affine = series_affine(start, (-1, 0, 0, 0, 1, 0), spacing)
    flipped = Volume(hu[::-1, :, ::-1].copy(), spacing, "1.2", "1.2.3", hu.shape[0], affine=flipped_affine)
    x1, g1 = preprocess_chest_ct(straight)
    x2, g2 = preprocess_chest_ct(flipped)
    assert np.allclose(g1.matrix[:3, :3], g2.matrix[:3, :3])
    # The crop centre comes from coarse samples, which a flip moves by a few mm; both grids sit
    # on one 2.5 mm lattice, so they differ by whole voxels: compare where they overlap.
    shift = g1.to_index(g2.to_patient([0, 0, 0]))
    assert np.allclose(shift, np.round(shift), atol=1e-6) and np.abs(shift).max() <= 4
    s = np.round(shift).astype(int)
    in1 = tuple(slice(max(v, 0), n + min(v, 0)) for v, n in zip(s, MAP_SHAPE, strict=True))
    in2 = tuple(slice(max(-v, 0), n + min(-v, 0)) for v, n in zip(s, MAP_SHAPE, strict=True))
    assert np.abs(x1[0][in1] - x2[0][in2]).mean() < 0.01 and (x1[1][in1] != x2[1][in2]).mean() < 0.01


def test_empty_volume_is_refused() -> None:
    with pytest.raises(ValueError, match="no body"):
        preprocess_chest_ct(np.full((20, 64, 64), -1000.0, np.float32), (2.5, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        preprocess_chest_ct(np.zeros((20, 64, 64), np.float32))


def test_nodules_of_a_response_names_each_lung_and_agrees_with_the_flag() -> None:
    geometry = _geometry()
    # Map x index 30 -> patient x -110 + 75 = -35 mm (the right lung); 100 -> +140 mm (left).
    m = np.maximum(
        _sphere(np.array([30.0, 30.0, 30.0]), 10.0, 2.5, p=0.7),
        _sphere(np.array([60.0, 50.0, 100.0]), 8.0, 2.5, p=0.95),
    )
    nodules = nodules_of({NODULE_OUTPUT: m[None]}, geometry, 0.3, positive=True)
    assert nodules is not None and [n.lung for n in nodules] == ["left", "right"]
    assert [round(n.probability, 2) for n in nodules] == [0.95, 0.7]
    # The map's summed probability is the volume: the 0.7 sphere reads as 0.7 of its volume.
    assert abs(nodules[0].diameter_mm - 8.0 * 0.95 ** (1 / 3)) < 0.5
    assert abs(nodules[1].diameter_mm - 10.0 * 0.7 ** (1 / 3)) < 0.5
    assert nodules_of({NODULE_OUTPUT: m}, geometry, 0.99, positive=False) == ()
    assert nodules_of({"localisation_map": m}, geometry, 0.3, positive=True) is None  # another model
    with pytest.raises(ValueError, match="NoduleGeometry"):
        nodules_of({NODULE_OUTPUT: m}, None, 0.3, positive=True)
    with pytest.raises(ValueError, match="no voxel"):  # a flag the map does not back
        nodules_of({NODULE_OUTPUT: m}, geometry, 0.99, positive=True)
    with pytest.raises(ValueError, match="logits"):
        nodules_of({NODULE_OUTPUT: m * 5}, geometry, 0.3, positive=True)
