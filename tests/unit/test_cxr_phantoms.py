"""Chest radiograph phantoms for the CR/DX route: labels and intensities."""

from __future__ import annotations

import numpy as np
import pytest

from models.cxr_triage.phantoms import MAX_VALUE, SIDES, chest_radiograph_phantom


def test_a_pneumothorax_is_labelled_with_side_size_and_mask() -> None:
    rng = np.random.default_rng(51)
    for side in SIDES:
        r = chest_radiograph_phantom(rng, pneumothorax=True, side=side)
        assert r.has_pneumothorax and r.side == side and 0.05 <= r.rim_fraction <= 0.45
        assert r.mask is not None and r.mask.shape == r.pixels.shape and r.mask.any()
        # The last column is the patient's left.
        cols = np.nonzero(r.mask)[1]
        assert (cols.mean() > r.pixels.shape[1] / 2) == (side == "left")


def test_a_normal_radiograph_has_no_pneumothorax() -> None:
    r = chest_radiograph_phantom(np.random.default_rng(52), pneumothorax=False)
    assert not r.has_pneumothorax and r.side is None and r.mask is None and r.rim_fraction == 0.0


def test_intensities_look_like_a_chest_radiograph() -> None:
    r = chest_radiograph_phantom(np.random.default_rng(53), pneumothorax=True, min_rim_fraction=0.2)
    px = r.pixels.astype(float)
    assert r.pixels.dtype == np.uint16 and px.min() >= 0 and px.max() <= MAX_VALUE
    rows, cols = px.shape
    assert 1.0 <= r.pixel_mm[0] <= 1.4 and r.pixel_mm[0] == r.pixel_mm[1]
    # Outside the body (image corners at the top) is dark; the spine/mediastinum column is bright;
    # the lungs are in between.
    corner = np.median(px[: rows // 10, : cols // 12])
    mediastinum = np.median(px[rows // 3 : rows // 2, cols // 2 - 3 : cols // 2 + 3])
    lateral = px[rows // 3 : rows // 2, cols // 5 : cols // 3]
    assert corner < np.median(lateral) < mediastinum
    # The pneumothorax (pleural air, no lung markings) is among the darkest parts of the chest.
    assert r.mask is not None
    assert px[r.mask].mean() < np.median(px)


def test_the_same_seed_gives_the_same_radiograph() -> None:
    a = chest_radiograph_phantom(np.random.default_rng(55), pneumothorax=True)
    b = chest_radiograph_phantom(np.random.default_rng(55), pneumothorax=True)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.side == b.side and a.rim_fraction == b.rim_fraction


def test_bad_side_is_refused() -> None:
    with pytest.raises(ValueError, match="side"):
        chest_radiograph_phantom(np.random.default_rng(0), pneumothorax=True, side="both")
