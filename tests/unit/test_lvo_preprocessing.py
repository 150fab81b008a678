"""The one CTA preprocessing (training = serving) for lvo_detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.dicom_writer import write_ct_series
from models.lvo_detector.phantoms import cta_phantom
from processors.dicom_volume import load_series
from processors.model_inputs import prepare_input
from processors.preprocessing import LVO_INPUT_SHAPE, preprocess_cta, preprocess_cta_with_mask
from processors.preprocessing.cta import _slab_mip


def test_shape_dtype_range_and_channels() -> None:
    ph = cta_phantom(np.random.default_rng(41), lvo=False)
    x = preprocess_cta(ph.hu, ph.spacing_zyx)
    assert x.shape == LVO_INPUT_SHAPE and x.dtype == np.float32
    vessels, bone, asymmetry = x
    assert vessels.min() >= 0.0 and vessels.max() <= 1.0 and bone.min() >= 0.0 and bone.max() <= 1.0
    assert asymmetry.min() >= -1.0 and asymmetry.max() <= 1.0
    assert vessels.max() > 0.3 and bone.max() > 0.5
    # Asymmetry is antisymmetric about the middle column (this side minus the mirror side).
    np.testing.assert_allclose(asymmetry, -asymmetry[..., ::-1], atol=1e-6)
    # Bone is stripped from the vessel channel: where the bone window saturates, no vessel signal.
    assert vessels[bone > 0.5].max() < 0.05
    # Vessels are thin: a small share of the volume is bright in the vessel channel.
    assert (vessels > 0.2).mean() < 0.05


def test_the_clot_mask_follows_the_image_and_the_occluded_side_has_less_contrast() -> None:
    for seed, side in ((42, "right"), (45, "left")):
        ph = cta_phantom(np.random.default_rng(seed), lvo=True, side=side)
        assert ph.occlusion_mask is not None
        x, mask = preprocess_cta_with_mask(ph.hu, ph.spacing_zyx, ph.occlusion_mask)
        np.testing.assert_array_equal(x, preprocess_cta(ph.hu, ph.spacing_zyx))
        assert mask.shape == LVO_INPUT_SHAPE[1:] and mask.max() > 0.5
        cols = np.nonzero(mask > 0.5)[2]
        w = LVO_INPUT_SHAPE[3] // 2
        assert (cols.mean() < w) == (side == "right")  # right side = low columns
        # At the clot, the vessel channel is dark and the asymmetry channel negative.
        near = mask > 0.5
        assert np.median(x[0][near]) < 0.3
        assert x[2][near].mean() < 0


def test_any_grid_gives_the_model_shape() -> None:
    rng = np.random.default_rng(43)
    for shape in ((20, 128, 128), (64, 160, 160), (40, 90, 110)):
        ph = cta_phantom(rng, lvo=False, shape=shape)
        assert preprocess_cta(ph.hu, ph.spacing_zyx).shape == LVO_INPUT_SHAPE


def test_slab_mip_is_adaptive_max_pooling() -> None:
    x = torch.rand(2, 37, 101, 113, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.adaptive_max_pool3d(x[None], LVO_INPUT_SHAPE[1:])[0]
    assert torch.equal(_slab_mip(x, LVO_INPUT_SHAPE[1:]), want)


def test_served_input_from_dicom_equals_the_training_input(tmp_path: Path) -> None:
    ph = cta_phantom(np.random.default_rng(44), lvo=True)
    files = write_ct_series(ph.hu, ph.spacing_zyx, tmp_path, series_description="CTA HEAD NECK")
    served, volume, _ = prepare_input("lvo_detector", files)
    np.testing.assert_allclose(served, preprocess_cta(ph.hu, ph.spacing_zyx), atol=1e-5)
    np.testing.assert_allclose(preprocess_cta(load_series(files)), served, atol=1e-6)
    assert volume.n_instances == ph.hu.shape[0]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="3D"):
        preprocess_cta(np.zeros((10, 10)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing_zyx is required"):
        preprocess_cta(np.zeros((4, 10, 10)))
    with pytest.raises(ValueError, match="no body"):
        preprocess_cta(np.full((4, 10, 10), -1000.0), (5, 1, 1))
    bad = np.zeros((4, 10, 10), dtype=np.float32)
    bad[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="NaN"):
        preprocess_cta(bad, (5, 1, 1))
