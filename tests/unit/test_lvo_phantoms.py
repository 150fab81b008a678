"""CTA phantoms for the LVO route: labels, Hounsfield units, and the DICOM geometry round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from models.dicom_writer import write_ct_series
from models.lvo_detector.phantoms import OCCLUSION_SITES, SIDES, cta_phantom
from models.phantoms import HU_MAX, HU_MIN
from processors.dicom_volume import load_series


def test_an_occlusion_is_labelled_with_side_site_and_a_clot_mask() -> None:
    rng = np.random.default_rng(31)
    for side in SIDES:
        ph = cta_phantom(rng, lvo=True, side=side)
        assert ph.has_lvo and ph.side == side and ph.occlusion is not None
        assert ph.occlusion.site in OCCLUSION_SITES
        assert 4 <= ph.occlusion.length_mm <= 20 and 0.1 <= ph.occlusion.collateral_fill <= 0.8
        assert ph.occlusion_mask is not None and ph.occlusion_mask.shape == ph.hu.shape
        assert ph.occlusion_mask.any()
        # Columns run towards the patient's left (LPS +x): the clot sits in that half.
        cols = np.nonzero(ph.occlusion_mask)[2]
        mid = (ph.hu.shape[2] - 1) / 2
        assert (cols.mean() > mid) == (side == "left"), (side, cols.mean(), mid)


def test_a_normal_study_has_no_occlusion() -> None:
    ph = cta_phantom(np.random.default_rng(32), lvo=False)
    assert not ph.has_lvo and ph.side is None and ph.occlusion is None and ph.occlusion_mask is None


def test_hounsfield_units_look_like_a_cta() -> None:
    ph = cta_phantom(np.random.default_rng(33), lvo=True)
    hu = ph.hu
    assert hu.dtype == np.int16 and hu.min() >= HU_MIN and hu.max() <= HU_MAX
    assert (hu <= -900).mean() > 0.2  # air around the head
    assert (hu > 700).any()  # skull
    # Contrast-filled arteries: a few thousand voxels in the 200-600 HU band (not bone).
    vessel = (hu > 200) & (hu < 600)
    assert vessel.sum() > 500
    # The clot is a missing contrast segment: clot voxels are at parenchyma/clot density.
    assert ph.occlusion_mask is not None
    clot = hu[ph.occlusion_mask]
    assert np.median(clot) < 120, np.median(clot)


def test_the_same_seed_gives_the_same_phantom() -> None:
    a = cta_phantom(np.random.default_rng(34), lvo=True)
    b = cta_phantom(np.random.default_rng(34), lvo=True)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.occlusion == b.occlusion and a.spacing_zyx == b.spacing_zyx


def test_bad_side_is_refused() -> None:
    with pytest.raises(ValueError, match="side"):
        cta_phantom(np.random.default_rng(0), lvo=True, side="middle")


def test_dicom_round_trip_keeps_hu_geometry_and_side(tmp_path: Path) -> None:
    ph = cta_phantom(np.random.default_rng(35), lvo=True, side="left")
    files = write_ct_series(
        ph.hu,
        ph.spacing_zyx,
        tmp_path,
        series_description="CTA HEAD NECK",
        body_part="HEAD",
        shuffle_files=True,
        rng=np.random.default_rng(2),
    )
    ds = dcmread(files[0])
    assert ds.SeriesDescription == "CTA HEAD NECK" and ds.BodyPartExamined == "HEAD" and ds.Modality == "CT"
    # Row direction +x is the patient's left; the first column is on the patient's right.
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds.ImagePositionPatient[0]) < 0
    vol = load_series(files)
    np.testing.assert_array_equal(vol.hu, ph.hu.astype(np.float32))
    np.testing.assert_allclose(vol.spacing_zyx, ph.spacing_zyx, rtol=1e-4)
    assert vol.n_instances == ph.hu.shape[0]
