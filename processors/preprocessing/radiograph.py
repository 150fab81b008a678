"""Chest radiograph (CR/DX), for pneumothorax triage: per-image percentile normalisation,
padded square in mm, area-averaged down (the method is below).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.transforms import SpatialPad

if TYPE_CHECKING:
    from processors.dicom_volume import Volume
from processors.preprocessing.common import (
    check_mask,
    resize_2d,
)

# --- Chest radiograph (CR/DX), for pneumothorax triage ------------------------------------
#
# A radiograph has no physical unit shared between vendors (detector dose, log, vendor
# processing), so intensities are normalised per image: the 1st-99th percentile range to
# [0, 1], after the loader has made "brighter = more attenuation" true (MONOCHROME1
# inverted) and put the patient's left on the right of the array and the head at the top
# (processors/radiograph.py). The image is padded square in mm and shrunk to
# CXR_INPUT_SHAPE by area averaging (a 3000-pixel detector image is averaged, not
# aliased, down to 1.5-1.7 mm pixels).
#
# CXR_INPUT_SHAPE = (1, 256, 256): ~1.7 mm pixels over a 430 mm detector — a pneumothorax
# rim of 5 mm or more is 3+ pixels wide and the pleural line still shows as an edge.
CXR_INPUT_SHAPE: tuple[int, int, int] = (1, 256, 256)  # (C, H, W)
CXR_PERCENTILES = (1.0, 99.0)


def preprocess_radiograph(image: Volume | np.ndarray, pixel_mm: Sequence[float] | None = None) -> np.ndarray:
    """A chest radiograph (rows, cols) in presentation values (higher = brighter) →
    float32 array of CXR_INPUT_SHAPE in [0, 1].

    `image` is a `Volume` from `processors.radiograph.load_radiograph` (one slice, its
    spacing used) or a 2D array with `pixel_mm` = (row, column) spacing in mm.
    """
    x, _ = _radiograph(image, pixel_mm, None)
    return x


def preprocess_radiograph_with_mask(
    pixels: np.ndarray, pixel_mm: Sequence[float], mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Training only: `preprocess_radiograph`'s input plus a pixel mask (e.g. the pleural
    air) through the same pad and resize, as a (H, W) float32 fraction in [0, 1]."""
    check_mask(mask, pixels, "image")
    x, m = _radiograph(pixels, pixel_mm, mask)
    assert m is not None
    return x, m


def _radiograph(
    image: Volume | np.ndarray, pixel_mm: Sequence[float] | None, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(image, np.ndarray):
        pixels = image
        if pixel_mm is None:
            raise ValueError("pixel_mm is required with a plain array")
        spacing = tuple(float(s) for s in pixel_mm)
    else:
        if image.hu.ndim != 3 or image.hu.shape[0] != 1:
            raise ValueError(f"expected a single radiograph, got a volume of shape {image.hu.shape}")
        pixels = image.hu[0]
        spacing = tuple(float(s) for s in (pixel_mm or image.spacing_zyx[1:]))
    if pixels.ndim != 2 or min(pixels.shape) < 16:
        raise ValueError(f"expected a 2D image of at least 16 x 16 pixels, got shape {pixels.shape}")
    if len(spacing) != 2 or min(spacing) <= 0:
        raise ValueError(f"pixel_mm must be two positive mm values, got {pixel_mm}")
    pixels = np.asarray(pixels, dtype=np.float32)
    if not np.isfinite(pixels).all():
        raise ValueError("image contains NaN or infinity")
    lo, hi = np.percentile(pixels, CXR_PERCENTILES)
    # np.float32(lo): percentile returns float64 scalars, which numpy 2 (unlike the pinned
    # 1.26) promotes the whole image with: a float64 copy of a 3000 x 2400 detector image.
    x = torch.from_numpy(np.clip((pixels - np.float32(lo)) / max(float(hi - lo), 1e-6), 0.0, 1.0))[None]
    if mask is not None:
        x = torch.cat([x, torch.from_numpy(mask.astype(np.float32))[None]])
    with torch.no_grad():
        side_mm = max(x.shape[1] * spacing[0], x.shape[2] * spacing[1])
        x = torch.as_tensor(
            SpatialPad(spatial_size=(round(side_mm / spacing[0]), round(side_mm / spacing[1])))(x)
        )
        x = resize_2d(x, CXR_INPUT_SHAPE[1:])
    out = np.clip(x.numpy().astype(np.float32), 0.0, 1.0)
    return np.ascontiguousarray(out[:1]), (out[1] if mask is not None else None)
