"""Chest CT, for lung nodules: a fixed 2.5 mm grid centred on the lungs, a lung window
and a lung-region channel (the method is below).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage

if TYPE_CHECKING:
    from processors.dicom_volume import Volume
from processors.preprocessing.common import (
    ANTI_ALIAS_FROM,
    check_mask,
    validated,
)

# --- Chest CT, for lung nodules ---------------------------------------------------------
#
# A nodule is a 4-30 mm blob in the lung; what the network has to tell it from is a vessel
# (a tube of the same ~40 HU) and the chest wall or heart it may touch. So:
#
# 1. The lungs are found coarsely (air inside the body, on every 4th pixel) and the grid
#    is centred on their bounding box.
# 2. The grid is FIXED in millimetres: NODULE_GRID_MM isotropic voxels along patient z, y,
#    x (resampled through the series' affine, so any orientation or slice order lands the
#    same way), NODULE_INPUT_SHAPE voxels = 240 x 200 x 320 mm, both lungs of an adult.
#    A fixed voxel size means a 10 mm nodule is the same 4 voxels in every study, and the
#    map's summed probability is a volume in mm3 (processors/nodules.py). Shrinking by
#    1.5x or more is first box-averaged (a 0.7 mm series averages its noise, not aliases it).
# 3. Channels: 0 — lung window -1000..200 HU (lung ~0.13, ground glass 0.3-0.5, vessels and
#    solid nodules ~0.87); 1 — the lung region (air inside the body with what it encloses
#    on each slice, closed by 5 mm so a juxta-pleural nodule is mostly inside): where
#    nodules can be, so the heart, mediastinum and chest wall need not be learnt as "no".
#
# NODULE_INPUT_SHAPE = (2, 96, 80, 128): ~0.98 M voxels per channel; 2.5 mm keeps a 6 mm
# nodule at ~14 voxels and a 1 mm vessel at partial volume, as on a thick-slab read.
NODULE_GRID_MM = 2.5
NODULE_INPUT_SHAPE: tuple[int, int, int, int] = (2, 96, 80, 128)  # (C, D, H, W) = (C, z, y, x)
NODULE_WINDOW_HU = (-1000.0, 200.0)
NODULE_BODY_HU = -400.0
NODULE_LUNG_CLOSING_VOXELS = 2
_INPLANE = np.zeros((3, 3, 3), dtype=bool)
_INPLANE[1] = ndimage.generate_binary_structure(2, 1)


def preprocess_chest_ct(
    volume: Volume | np.ndarray, spacing_zyx: Sequence[float] | None = None
) -> tuple[np.ndarray, NoduleGeometry]:
    """A chest CT in HU → (float32 array of NODULE_INPUT_SHAPE in [0, 1], the geometry that
    maps a voxel of it (and of the model's nodule_map) to DICOM patient LPS mm).

    A `Volume` from `load_series` is resampled through its own affine; a plain (z, y, x)
    array (or a Volume without one) is taken as `write_ct_series` writes it (axial, HFS,
    centred on the patient origin): the phantoms' ground truth is in those coordinates.
    """
    x, _, geometry = _chest_ct(volume, spacing_zyx, None)
    return x, geometry


def preprocess_chest_ct_with_mask(
    hu: np.ndarray, spacing_zyx: Sequence[float], mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, NoduleGeometry]:
    """Training only: `preprocess_chest_ct` plus a voxel mask (the nodules) through the same
    averaging and resampling, as a (D, H, W) float32 fraction in [0, 1] per grid voxel."""
    check_mask(mask, hu, "volume")
    x, m, geometry = _chest_ct(hu, spacing_zyx, mask)
    assert m is not None
    return x, m, geometry


def _chest_ct(
    volume: Volume | np.ndarray, spacing_zyx: Sequence[float] | None, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, NoduleGeometry]:
    from processors.dicom_volume import centred_affine
    from processors.nodules import NoduleGeometry

    hu, spacing = validated(volume, spacing_zyx)
    affine = None if isinstance(volume, np.ndarray) else volume.affine
    if affine is None or spacing_zyx is not None:
        affine = centred_affine(hu.shape, spacing)
    affine = np.asarray(affine, dtype=np.float64)

    # 1. Where the lungs are: air enclosed by the body on (every 4th pixel of) each slice.
    step = (max(1, round(5.0 / spacing[0])), 4, 4)
    coarse = hu[:: step[0], :: step[1], :: step[2]]
    body = coarse > NODULE_BODY_HU
    if not body.any():
        raise ValueError(f"no body in the volume (nothing above {NODULE_BODY_HU:g} HU)")
    lungs = _fill_slices(body) & ~body
    found = lungs if lungs.sum() >= 8 else body  # no lungs: centre on the body
    present = [np.flatnonzero(found.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    lo, hi = np.array([p[0] for p in present]), np.array([p[-1] for p in present])
    centre_index = (lo + hi) / 2 * np.asarray(step)
    # Snapped to the grid's own lattice: two series of one patient (or one series stored in
    # another orientation) then give grids that differ by whole voxels, not by resampling.
    centre = np.round((centre_index @ affine[:3, :3].T + affine[:3, 3]) / NODULE_GRID_MM) * NODULE_GRID_MM

    # 2. The grid, axis-aligned in patient space: index (z, y, x) -> LPS (x, y, z).
    d, h, w = NODULE_INPUT_SHAPE[1:]
    g = NODULE_GRID_MM
    grid_affine = np.eye(4)
    grid_affine[:3, :3] = [[0, 0, g], [0, g, 0], [g, 0, 0]]
    grid_affine[:3, 3] = centre - grid_affine[:3, :3] @ ((np.array([d, h, w]) - 1) / 2)

    stack = [hu + 1000.0] + ([mask.astype(np.float32)] if mask is not None else [])
    x = torch.from_numpy(np.stack(stack).astype(np.float32, copy=False))[None]
    kernel = tuple(_nodule_kernel(s) for s in spacing)
    with torch.no_grad():
        if max(kernel) > 1:
            x = torch.nn.functional.avg_pool3d(x, kernel_size=kernel, stride=kernel)
        # Pooled voxel p covers original voxels p k .. p k + k - 1: its centre is p k + (k - 1) / 2.
        pool = np.eye(4)
        pool[:3, :3] = np.diag(kernel)
        pool[:3, 3] = (np.asarray(kernel) - 1) / 2
        to_source = np.linalg.inv(affine @ pool) @ grid_affine  # grid index -> pooled index
        size = np.array(x.shape[2:], dtype=np.float64)
        # grid_sample wants (x, y, z) = (W, H, D) of the source in [-1, 1] (align_corners).
        m = to_source[:3][::-1] * (2.0 / np.maximum(size[::-1, None] - 1, 1))
        m[:, 3] -= 1.0
        axes = [torch.arange(n, dtype=torch.float64) for n in (d, h, w)]
        mt = torch.from_numpy(m)
        coords = (
            axes[0][:, None, None, None] * mt[:, 0]
            + axes[1][None, :, None, None] * mt[:, 1]
            + axes[2][None, None, :, None] * mt[:, 2]
            + mt[:, 3]
        )
        out = torch.nn.functional.grid_sample(
            x, coords[None].float(), mode="bilinear", padding_mode="zeros", align_corners=True
        )[0].numpy()
    grid_hu = out[0] - 1000.0  # outside the field of view: air
    image = np.clip((grid_hu - NODULE_WINDOW_HU[0]) / (NODULE_WINDOW_HU[1] - NODULE_WINDOW_HU[0]), 0, 1)

    # 3. The lung region on the grid.
    body_g = grid_hu > NODULE_BODY_HU
    region = _fill_slices(_fill_slices(body_g) & ~body_g)
    region = ndimage.binary_closing(
        region, structure=ndimage.generate_binary_structure(3, 1), iterations=NODULE_LUNG_CLOSING_VOXELS
    )
    tensor = np.stack([image, region.astype(np.float32)]).astype(np.float32)
    target = np.clip(out[1], 0.0, 1.0).astype(np.float32) if mask is not None else None
    return np.ascontiguousarray(tensor), target, NoduleGeometry.from_matrix(grid_affine, (d, h, w))


def _nodule_kernel(spacing_mm: float) -> int:
    """Box-averaging factor towards NODULE_GRID_MM along an axis of this spacing (1: the
    interpolation alone is fine, the shrink is below ANTI_ALIAS_FROM)."""
    g = NODULE_GRID_MM
    return int(g // spacing_mm) if g / spacing_mm >= ANTI_ALIAS_FROM else 1


def nodule_pooling(
    shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float]
) -> tuple[int, int, int]:
    """The nodule model's loader pooling: the preprocessing's own box average, done by the
    loader on axes longer than NODULE_FULL_RESOLUTION_MAX voxels. On the pooled volume the
    preprocessing's kernel is then 1 (a spacing of at least 2.5 / 1.5 mm remains), so the
    average is the same one, taken before the float volume exists instead of after."""
    k = [
        _nodule_kernel(float(s)) if int(n) > NODULE_FULL_RESOLUTION_MAX else 1
        for n, s in zip(shape_zyx, spacing_zyx, strict=True)
    ]
    return (k[0], k[1], k[2])


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Holes filled on each axial slice separately (what a lung is inside a body outline),
    with empty slices padded above and below so the end slices' holes are holes too."""
    padded = np.pad(mask, ((1, 1), (0, 0), (0, 0)))
    return ndimage.binary_fill_holes(padded, structure=_INPLANE)[1:-1]


if TYPE_CHECKING:
    from processors.nodules import NoduleGeometry
# Chest CT: the nodule preprocessing box-averages to its 2.5 mm grid anyway; on axes longer
# than this the loader does that averaging (by the same integer kernel) instead of it.
NODULE_FULL_RESOLUTION_MAX = 256
