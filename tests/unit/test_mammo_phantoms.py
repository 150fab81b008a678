"""Mammography phantoms for the MG route: BI-RADS labels, lesion placement, intensities."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from models.mammo_birads import phantoms as mp
from models.mammo_birads.phantoms import (
    CATEGORIES,
    LESIONS,
    MAX_VALUE,
    VIEWS,
    MammoView,
    mammo_study_phantom,
    mammo_view_phantom,
    overall_category,
)
from processors.birads import CONCERN_ORDER

MASS_RANGES = {
    "popcorn_mass": (8, 20),
    "fatty_hilum_node": (8, 15),
    "oval_circumscribed": (5, 12),
    "indistinct_mass": (8, 25),
    "pleomorphic_calcs": (5, 15),
    "spiculated_mass": (8, 30),
    "spiculated_calcs": (8, 30),
}


def _with_geometry(seed: int, **kwargs) -> tuple[MammoView, mp._Geometry]:  # type: ignore[no-untyped-def]
    """The view mammo_view_phantom draws for `seed`, with the ground-truth breast and muscle
    behind it (the same draws, in the same order)."""
    rng = np.random.default_rng(seed)
    category = kwargs["category"]
    plan = mp._draw_plan(rng, category, kwargs.get("lesion"))
    view, geometry = mp._render(
        rng,
        category=category,
        laterality=kwargs.get("laterality", "L"),
        view=kwargs.get("view", "CC"),
        plan=plan,
        breast=mp._draw_breast(rng),
        shape=None,
    )
    public = mammo_view_phantom(np.random.default_rng(seed), **kwargs)
    np.testing.assert_array_equal(view.pixels, public.pixels)
    return view, geometry


def _labels(v: MammoView) -> tuple[object, ...]:
    """Everything but the arrays (dataclass equality would compare them element-wise)."""
    return (v.pixel_mm, v.laterality, v.view, v.category, v.lesion, v.lesion_mm, v.centre_px)


def test_overall_category_follows_the_acr_hierarchy() -> None:
    assert overall_category([1, 0, 4]) == 4
    assert overall_category([2, 0]) == 0
    assert overall_category([3, 2, 1]) == 3
    assert overall_category([1, 1, 1, 1]) == 1
    assert overall_category([5, 4, 0]) == 5
    assert overall_category([3, 6]) == 6
    assert CONCERN_ORDER == (1, 2, 3, 6, 0, 4, 5) and 6 not in CATEGORIES
    with pytest.raises(ValueError, match="no categories"):
        overall_category([])
    with pytest.raises(ValueError, match="0-6"):
        overall_category([7])


@pytest.mark.parametrize(("category", "lesion"), [(c, k) for c in (2, 3, 4, 5) for k in LESIONS[c]])
@pytest.mark.parametrize("view", ["CC", "MLO"])
def test_a_finding_is_labelled_and_lies_in_the_breast_away_from_skin_and_muscle(
    category: int, lesion: str, view: str
) -> None:
    v, geo = _with_geometry(100 + category, category=category, lesion=lesion, view=view, laterality="R")
    assert (v.category, v.lesion, v.view, v.laterality) == (category, lesion, view, "R")
    assert lesion in LESIONS[category]
    if lesion in MASS_RANGES:
        lo, hi = MASS_RANGES[lesion]
        assert lo <= v.lesion_mm <= hi
    else:
        assert v.lesion_mm > 0
    assert v.mask is not None and v.mask.shape == v.pixels.shape and v.mask.dtype == bool and v.mask.any()
    assert v.centre_px is not None
    r, c = (round(x) for x in v.centre_px)
    # Inside the breast, 15 mm or more from the skin line, not in the muscle.
    assert geo.breast[r, c] and geo.skin_mm[r, c] >= mp.MIN_SKIN_DISTANCE_MM
    assert geo.breast[v.mask].all()
    assert not (v.mask & geo.muscle).any()
    if view == "MLO":
        assert geo.muscle.any() and geo.muscle[: v.pixels.shape[0] // 4, :5].all()
    else:
        assert not geo.muscle.any()
    # The mask is near its centre.
    rows, cols = np.nonzero(v.mask)
    extent_px = v.lesion_mm / v.pixel_mm[0]
    assert abs(rows.mean() - v.centre_px[0]) < extent_px and abs(cols.mean() - v.centre_px[1]) < extent_px


def test_a_finding_is_brighter_than_the_tissue_around_it() -> None:
    for seed, (category, lesion) in enumerate(
        [(3, "oval_circumscribed"), (4, "pleomorphic_calcs"), (5, "spiculated_mass"), (2, "coarse_calcs")]
    ):
        v = mammo_view_phantom(np.random.default_rng(200 + seed), category=category, lesion=lesion)
        assert v.mask is not None
        px = v.pixels.astype(float)
        ring = ndimage.binary_dilation(v.mask, iterations=8) & ~ndimage.binary_dilation(v.mask, iterations=3)
        assert px[v.mask].mean() > px[ring].mean(), lesion


@pytest.mark.parametrize("category", [0, 1])
def test_no_lesion_for_normal_and_incomplete_views(category: int) -> None:
    rng = np.random.default_rng(300)
    for kind in LESIONS[category]:
        v = mammo_view_phantom(rng, category=category, lesion=kind, view="MLO")
        assert v.category == category and v.lesion == kind
        assert v.lesion_mm == 0.0 and v.centre_px is None and v.mask is None


def test_a_lesion_kind_must_fit_the_category() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="not drawn for category 3"):
        mammo_view_phantom(rng, category=3, lesion="spiculated_mass")
    with pytest.raises(ValueError, match="category"):
        mammo_view_phantom(rng, category=6)
    with pytest.raises(ValueError, match="laterality"):
        mammo_view_phantom(rng, category=1, laterality="B")
    with pytest.raises(ValueError, match="view"):
        mammo_view_phantom(rng, category=1, view="XCCL")
    with pytest.raises(ValueError, match="side"):
        mammo_study_phantom(rng, category=4, side="both")


def test_intensities_look_like_a_mammogram() -> None:
    v, geo = _with_geometry(400, category=1, view="MLO")
    px = v.pixels.astype(float)
    assert v.pixels.dtype == np.uint16 and px.min() >= 0 and px.max() <= MAX_VALUE
    rows_mm, cols_mm = (n * s for n, s in zip(v.pixels.shape, v.pixel_mm, strict=True))
    assert 0.6 <= v.pixel_mm[0] <= 0.8 and v.pixel_mm[0] == v.pixel_mm[1]
    assert 215 <= rows_mm <= 261 and 275 <= cols_mm <= 321
    # Air outside the breast is dark; the pectoral muscle is brighter than the fatty breast.
    air = ~ndimage.binary_dilation(geo.breast, iterations=4)
    assert np.median(px[air]) < 100
    fat = geo.breast & ~geo.muscle & (geo.skin_mm > 15) & (px < np.percentile(px[geo.breast], 30))
    muscle = ndimage.binary_erosion(geo.muscle, iterations=3)
    assert np.median(px[muscle]) > np.median(px[fat]) + 200
    # The chest wall is at column 0, the nipple points to the last column.
    breast_cols = np.nonzero(geo.breast.any(axis=0))[0]
    assert breast_cols[0] == 0 and breast_cols[-1] < v.pixels.shape[1] - 1
    # A darker rim: thinner tissue near the skin line.
    rim = geo.breast & (geo.skin_mm > 2) & (geo.skin_mm < 4) & (np.arange(px.shape[1])[None, :] > 20)
    deep = geo.breast & ~geo.muscle & (geo.skin_mm > 20)
    assert np.median(px[rim]) < np.median(px[deep])


def test_the_same_seed_gives_the_same_phantom() -> None:
    a = mammo_view_phantom(np.random.default_rng(55), category=5, view="MLO")
    b = mammo_view_phantom(np.random.default_rng(55), category=5, view="MLO")
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert _labels(a) == _labels(b) and a.mask is not None and b.mask is not None
    np.testing.assert_array_equal(a.mask, b.mask)
    s1 = mammo_study_phantom(np.random.default_rng(56), category=4)
    s2 = mammo_study_phantom(np.random.default_rng(56), category=4)
    assert (s1.category, s1.side) == (s2.category, s2.side)
    for v1, v2 in zip(s1.views, s2.views, strict=True):
        np.testing.assert_array_equal(v1.pixels, v2.pixels)
        assert _labels(v1) == _labels(v2)
    c = mammo_view_phantom(np.random.default_rng(57), category=5, view="MLO")
    assert c.pixels.shape != a.pixels.shape or not np.array_equal(c.pixels, a.pixels)


@pytest.mark.parametrize("category", [2, 3, 4, 5])
def test_a_study_shows_the_finding_in_both_views_of_one_breast(category: int) -> None:
    rng = np.random.default_rng(500 + category)
    for side in ("left", "right", None):
        s = mammo_study_phantom(rng, category=category, side=side)
        assert [v.laterality + v.view for v in s.views] == list(VIEWS)
        assert s.category == category and s.side in ("left", "right")
        if side is not None:
            assert s.side == side
        letter = s.side[0].upper()
        mine = [v for v in s.views if v.laterality == letter]
        other = [v for v in s.views if v.laterality != letter]
        assert all(v.category == category for v in mine) and all(v.category == 1 for v in other)
        assert mine[0].lesion == mine[1].lesion and mine[0].lesion_mm == mine[1].lesion_mm
        assert all(v.mask is not None and v.centre_px is not None for v in mine)
        # The same depth from the chest wall in the CC and the MLO.
        depth = [v.centre_px[1] * v.pixel_mm[1] for v in mine if v.centre_px is not None]
        assert abs(depth[0] - depth[1]) < 6.0
        assert all(v.lesion == "none" and v.mask is None for v in other)
        # One detector for the study.
        assert len({(v.pixels.shape, v.pixel_mm) for v in s.views}) == 1


def test_normal_and_incomplete_studies() -> None:
    rng = np.random.default_rng(600)
    normal = mammo_study_phantom(rng, category=1)
    assert normal.category == 1 and normal.side is None
    assert all(v.category == 1 and v.lesion == "none" for v in normal.views)
    for _ in range(3):
        s = mammo_study_phantom(rng, category=0)
        bad = [v for v in s.views if v.category == 0]
        assert s.category == 0 and len(bad) == 1 and bad[0].lesion in LESIONS[0]
        assert s.side == {"L": "left", "R": "right"}[bad[0].laterality]
        assert all(v.category == 1 for v in s.views if v is not bad[0])
        assert all(v.mask is None for v in s.views)
    assert overall_category(v.category for v in s.views) == s.category


def _hf_energy(pixels: np.ndarray) -> float:
    """Fine-scale gradient energy inside the breast, along its weaker axis, per unit signal."""
    px = ndimage.gaussian_filter(pixels.astype(float), 1.0)  # above the white detector noise
    breast = ndimage.binary_erosion(pixels > np.percentile(pixels, 60), iterations=8)[:-1, :-1]
    along_rows = np.abs(np.diff(px, axis=0))[:, :-1][breast].mean()
    along_cols = np.abs(np.diff(px, axis=1))[:-1][breast].mean()
    return float(min(along_rows, along_cols) / np.median(pixels[:-1, :-1][breast]))


def test_inadequate_views_visibly_differ_from_a_normal_one() -> None:
    for seed in range(3):
        for view in ("CC", "MLO"):
            normal = mammo_view_phantom(np.random.default_rng(seed), category=1, view=view)
            cut = mammo_view_phantom(np.random.default_rng(seed), category=0, lesion="cutoff", view=view)
            motion = mammo_view_phantom(np.random.default_rng(seed), category=0, lesion="motion", view=view)
            dark = mammo_view_phantom(
                np.random.default_rng(seed), category=0, lesion="underexposed", view=view
            )
            # Cut off: the breast runs into the far edge (the nipple is off the detector).
            assert np.median(normal.pixels[:, -3:]) < 100
            assert (cut.pixels[:, -3:].astype(float) > 500).mean() > 0.2
            # Motion: the fine detail is smeared out along one axis.
            assert _hf_energy(motion.pixels) < 0.85 * _hf_energy(normal.pixels)
            # Under-exposed: a low mean, and little contrast above the noise.
            assert dark.pixels.mean() < 0.3 * normal.pixels.mean()
            assert np.percentile(dark.pixels, 99) < 0.3 * np.percentile(normal.pixels, 99)
