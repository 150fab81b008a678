"""Mammography (MG), for the BI-RADS model: four standard views, chest wall at column 0,
per-view percentile normalisation, 1 mm pixels on a fixed grid (the method is below).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from processors.birads import VIEWS as MAMMO_VIEWS

if TYPE_CHECKING:
    from processors.mammogram import Mammogram
from processors.preprocessing.common import (
    check_mask,
    resize_2d,
)

# Mammography (MG) for the BI-RADS model, one channel per standard view in
# processors.birads.VIEWS order (RCC, RMLO, LCC, LMLO); a view the series lacks is a
# channel of zeros, which the served model reads as "absent" (models/mammo_birads/net.py).
#
# Each view arrives with the chest wall at column 0 and the nipple towards the last
# column, whatever the breast or the sender (processors/mammogram.py), so one network
# reads every view the same way. Intensities are normalised per view (no physical unit
# is shared between vendors): the 1st-99.9th percentile range to [0, 1]: dense tissue
# stays below the top (a mass over it must still be brighter) and calcifications, brighter
# still, clip to 1 rather than set the scale.
# Then to MAMMO_PIXEL_MM pixels by area averaging (a 0.07 mm detector image is averaged
# down, not aliased) and onto a fixed grid in mm: MAMMO_VIEW_SHAPE rows centred on the
# image, columns from the chest wall (a breast is at most ~190 mm deep under compression).
#
# Why 1 mm: a 5 mm mass is 5 pixels and a cluster of 0.5-1 mm calcifications still shows
# as bright specks (averaged, not lost); 256 x 192 per view keeps the four views of a
# study near the chest X-ray model's input size per view.
MAMMO_PIXEL_MM = 1.0
MAMMO_VIEW_SHAPE: tuple[int, int] = (256, 192)  # (rows, cols) at MAMMO_PIXEL_MM
MAMMO_INPUT_SHAPE: tuple[int, int, int] = (len(MAMMO_VIEWS), *MAMMO_VIEW_SHAPE)
MAMMO_PERCENTILES = (1.0, 99.9)


def preprocess_mammo_view(
    pixels: np.ndarray, pixel_mm: Sequence[float], mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """One view (rows, cols; brighter = denser; chest wall at column 0) → a (rows, cols)
    float32 image of MAMMO_VIEW_SHAPE in [0, 1], and (training only) a pixel mask through
    the same resampling as the fraction of each output pixel it covers."""
    if pixels.ndim != 2 or min(pixels.shape) < 16:
        raise ValueError(f"expected a 2D image of at least 16 x 16 pixels, got shape {pixels.shape}")
    spacing = tuple(float(s) for s in pixel_mm)
    if len(spacing) != 2 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError(f"pixel_mm must be two positive mm values, got {pixel_mm}")
    if mask is not None:
        check_mask(mask, pixels, "image")
    image = np.asarray(pixels, dtype=np.float32)
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinity")
    lo, hi = np.percentile(image, MAMMO_PERCENTILES)
    if float(hi - lo) <= 1e-6 * max(abs(float(hi)), 1.0):
        raise ValueError("image has no contrast (its pixels are all but constant): nothing to read")
    # float32 throughout (see _radiograph: numpy 2 would promote the image to float64).
    x = torch.from_numpy(np.clip((image - np.float32(lo)) / float(hi - lo), 0.0, 1.0))[None]
    if mask is not None:
        x = torch.cat([x, torch.from_numpy(mask.astype(np.float32))[None]])
    size = tuple(max(1, round(n * s / MAMMO_PIXEL_MM)) for n, s in zip(x.shape[1:], spacing, strict=True))
    with torch.no_grad():
        x = resize_2d(x, size)
    rows, cols = MAMMO_VIEW_SHAPE
    out = torch.zeros((x.shape[0], rows, cols))
    # Rows: centred (crop or pad both sides); columns: from the chest wall.
    src0 = max(0, (x.shape[1] - rows) // 2)
    dst0 = max(0, (rows - x.shape[1]) // 2)
    n_rows = min(rows, x.shape[1])
    n_cols = min(cols, x.shape[2])
    out[:, dst0 : dst0 + n_rows, :n_cols] = x[:, src0 : src0 + n_rows, :n_cols]
    result = np.clip(out.numpy().astype(np.float32), 0.0, 1.0)
    return np.ascontiguousarray(result[0]), (np.ascontiguousarray(result[1]) if mask is not None else None)


def preprocess_mammogram(mammogram: Mammogram) -> np.ndarray:
    """A loaded MG series (processors.mammogram.load_mammogram) → float32 array of
    MAMMO_INPUT_SHAPE, zeros for the standard views it lacks."""
    out = np.zeros(MAMMO_INPUT_SHAPE, dtype=np.float32)
    for i, name in enumerate(MAMMO_VIEWS):
        view = mammogram.views.get(name)
        if view is None:
            continue
        try:
            out[i], _ = preprocess_mammo_view(view.pixels, view.pixel_mm)
        except ValueError as exc:
            raise ValueError(f"{name} (instance {view.instance_number}): {exc}") from exc
    return out
