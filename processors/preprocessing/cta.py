"""CT angiography of the head and neck, for LVO: thick-slab MIPs, midline-aligned, with a
hemispheric-asymmetry channel (the method is below).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.transforms import SpatialPad
from scipy import ndimage

if TYPE_CHECKING:
    from processors.dicom_volume import Volume
from processors.preprocessing.common import (
    BONE_STRUCTURE,
    check_mask,
    pool_to,
    validated,
    window,
)

# --- CT angiography of the head and neck, for LVO ---------------------------------------
#
# LVO on a CTA is read on thick-slab maximum intensity projections: an occluded segment
# is a gap in an otherwise continuous bright tube, and a MIP keeps a 2-4 mm vessel at full
# brightness where averaging it into a coarse voxel would dim it into the parenchyma. So:
#
# 1. Bone and its blurred rim (> 650 HU, dilated two voxels) are removed from the vessel
#    channel: contrast tops out near 550 HU, bone starts above it, and the inner table's
#    partial volume would otherwise draw a bright ring exactly where M2/M3 branches run.
# 2. Channels 0 — vessel window 100-550 HU on the stripped volume (parenchyma and clot ~0,
#    filled arteries 0.3-0.9); 1 — bone window 600-1600 HU, unstripped, so the network
#    knows where skull base and convexity are.
# 3. Crop to the body (> -300 HU), pad in-plane square in mm.
# 4. Thick-slab MIP onto a fixed grid: adaptive max pooling to LVO_INPUT_SHAPE (axes
#    with fewer voxels than the grid are first interpolated up). On a real 0.6 mm CTA that
#    is ~5 mm slabs; on the coarse phantoms it keeps thin vessels' partial volume.
# 5. Midline alignment: the in-plane rotation and shift that make the head most
#    mirror-symmetric (skull ring and vessels on an axial MIP) are applied to every slab,
#    so the middle column is the patient's midline whatever the head's pose.
# 6. Channel 2 — hemispheric asymmetry: the vessel channel, blurred to "how much contrast
#    is around here" (sigma ~2 voxels), minus its own left-right mirror image, x5, in
#    [-1, 1], zero on the midline itself. An occlusion is an absence, and an absence is
#    only visible against what should be there: the other side (how radiologists read a
#    CTA for LVO, and what hemispheric-comparison scores do). Negative = less contrast
#    than the mirror side. Without this channel the reference network did not learn the
#    task within the CPU budget (validation AUC ~0.5 after 3 epochs). Flipping the input
#    left-right flips and negates it (the training augmentation does both).
#
# LVO_INPUT_SHAPE = (3, 32, 96, 96): 96 across ~210 mm is ~2.2 mm, enough for M1 (3-4 mm)
# and proximal M2 (2-2.5 mm); 32 slabs over neck-to-vertex (~170 mm) are ~5 mm.
LVO_INPUT_SHAPE: tuple[int, int, int, int] = (3, 32, 96, 96)  # (C, D, H, W)
CTA_VESSEL_WINDOW_HU = (100.0, 550.0)
CTA_BONE_WINDOW_HU = (600.0, 1600.0)
CTA_BONE_HU = 650.0
BODY_HU = -300.0
CTA_ASYMMETRY_SIGMA = (1.0, 2.0, 2.0)  # voxels of the model grid
CTA_ASYMMETRY_GAIN = 5.0
CTA_MIDLINE_BAND = 3  # columns either side of the middle left out of the asymmetry channel
# Midline search: in-plane rotations (radians) and shifts (voxels of the model grid).
CTA_YAW_SEARCH = np.linspace(-0.24, 0.24, 17)
CTA_SHIFT_SEARCH = np.arange(-8.0, 8.5, 0.5)

_cta_vessel_window = window(CTA_VESSEL_WINDOW_HU)
_cta_bone_window = window(CTA_BONE_WINDOW_HU)


def preprocess_cta(volume: Volume | np.ndarray, spacing_zyx: Sequence[float] | None = None) -> np.ndarray:
    """A head/neck CTA in HU, (z, y, x) → float32 array of LVO_INPUT_SHAPE: channels 0-1 in
    [0, 1], channel 2 (asymmetry) in [-1, 1].

    Same calling convention as `preprocess_head_ct`. Left-right is kept as stored: with
    the writer's and every HFS axial series' orientation, the last axis runs towards the
    patient's left, which is what the side output of the LVO model refers to.
    """
    x, _ = _cta(volume, spacing_zyx, None)
    return x


def preprocess_cta_with_mask(
    hu: np.ndarray, spacing_zyx: Sequence[float], mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Training only: `preprocess_cta`'s input plus a voxel mask (e.g. the clot) through the
    same crop, pad and slab MIP, as a (D, H, W) float32 in [0, 1]."""
    check_mask(mask, hu, "volume")
    x, m = _cta(hu, spacing_zyx, mask)
    assert m is not None
    return x, m


def _cta(
    volume: Volume | np.ndarray, spacing_zyx: Sequence[float] | None, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    hu, spacing = validated(volume, spacing_zyx)
    # Crop to the body first (everything after is per voxel or per box, so cheaper on less).
    body = hu > BODY_HU
    if not body.any():
        raise ValueError(f"no body in the volume (nothing above {BODY_HU:g} HU)")
    box = []
    for axis in range(3):
        present = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(present[0]) - 2, 0), int(present[-1]) + 3))
    hu = hu[tuple(box)]
    bone = ndimage.binary_dilation(hu > CTA_BONE_HU, structure=BONE_STRUCTURE, iterations=2)
    channels = [
        np.asarray(_cta_vessel_window(np.where(bone, CTA_VESSEL_WINDOW_HU[0], hu))),
        np.asarray(_cta_bone_window(hu)),
    ]
    if mask is not None:
        channels.append(mask[tuple(box)].astype(np.float32))
    x = torch.from_numpy(np.stack(channels).astype(np.float32, copy=False))
    with torch.no_grad():
        rows_mm, cols_mm = x.shape[2] * spacing[1], x.shape[3] * spacing[2]
        side_mm = max(rows_mm, cols_mm)
        x = torch.as_tensor(
            SpatialPad(spatial_size=(-1, round(side_mm / spacing[1]), round(side_mm / spacing[2])))(x)
        )
        x = _slab_mip(x, LVO_INPUT_SHAPE[1:])
        x = _align_midline(x)
    out = np.clip(x.numpy().astype(np.float32), 0.0, 1.0)
    vessels = out[0]
    local = ndimage.gaussian_filter(vessels, CTA_ASYMMETRY_SIGMA)
    asymmetry = np.clip(CTA_ASYMMETRY_GAIN * (local - local[..., ::-1]), -1.0, 1.0)
    # The midline itself (falx, basilar, ACAs, spine) is compared with itself: nothing to see.
    w = asymmetry.shape[-1]
    asymmetry[..., w // 2 - CTA_MIDLINE_BAND : w // 2 + CTA_MIDLINE_BAND] = 0.0
    image = np.concatenate([out[:2], asymmetry[None]]).astype(np.float32)
    return np.ascontiguousarray(image), (out[2] if mask is not None else None)


def _align_midline(x: torch.Tensor) -> torch.Tensor:
    """(C, D, H, W) → the same, turned and shifted in-plane so the head's plane of mirror
    symmetry is the middle column.

    The axial MIP of vessels + bone (skull ring, circle of Willis) is compared with its own
    mirror image for every in-plane rotation in CTA_YAW_SEARCH and shift in CTA_SHIFT_SEARCH;
    the best-correlated pose is applied to every slab. Heads lie turned by several degrees
    in a scanner; without this the asymmetry channel mostly measures the pose.
    """
    c, d, h, w = x.shape
    ref = (x[0] + x[1]).amax(dim=0)  # (H, W)
    theta, grid = _pose_search_grid(h, w)
    posed = torch.nn.functional.grid_sample(
        ref.expand(theta.shape[0], 1, h, w), grid, mode="bilinear", align_corners=False
    )[:, 0]
    a = posed - posed.mean(dim=(1, 2), keepdim=True)
    b = torch.flip(a, dims=(-1,))
    score = (a * b).sum(dim=(1, 2)) / ((a * a).sum(dim=(1, 2)) + 1e-6)
    best = int(torch.argmax(score))
    grid = torch.nn.functional.affine_grid(theta[best : best + 1], [1, c * d, h, w], align_corners=False)
    out = torch.nn.functional.grid_sample(
        x.reshape(1, c * d, h, w), grid, mode="bilinear", align_corners=False
    )
    return out.reshape(c, d, h, w)


@functools.cache
def _pose_search_grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate poses and their sampling grids: the same for every study of a grid size
    (computing them was half the cost of the whole CTA preprocessing)."""
    yaws = torch.tensor(CTA_YAW_SEARCH, dtype=torch.float32)
    shifts = torch.tensor(CTA_SHIFT_SEARCH, dtype=torch.float32) * (2.0 / w)  # normalised units
    yy, ss = torch.meshgrid(yaws, shifts, indexing="ij")
    theta = _in_plane(yy.reshape(-1), ss.reshape(-1))
    grid = torch.nn.functional.affine_grid(theta, [theta.shape[0], 1, h, w], align_corners=False)
    return theta, grid


def _in_plane(yaw: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Affine sampling matrices (N, 2, 3): output pixel ← input rotated by `yaw`, shifted along x."""
    cos, sin = torch.cos(yaw), torch.sin(yaw)
    return torch.stack(
        [torch.stack([cos, -sin, shift], dim=1), torch.stack([sin, cos, torch.zeros_like(yaw)], dim=1)], dim=1
    )


def _slab_mip(x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """(C, D, H, W) → (C, *grid): the maximum over each output cell's footprint (adaptive
    max pooling, in-plane then along z: the same maximum, several times faster than the 3D
    op). Axes shorter than the grid are interpolated up first."""
    up = tuple(max(n, g) for n, g in zip(x.shape[1:], grid, strict=True))
    if up != tuple(x.shape[1:]):
        x = torch.nn.functional.interpolate(x[None], size=up, mode="trilinear", align_corners=False)[0]
    c, d = x.shape[:2]
    x = torch.nn.functional.adaptive_max_pool2d(x, grid[1:])  # (C, D, h, w)
    x = x.permute(0, 2, 3, 1).reshape(1, -1, d)
    x = torch.nn.functional.adaptive_max_pool1d(x, grid[0])
    return x.reshape(c, grid[1], grid[2], grid[0]).permute(0, 3, 1, 2).contiguous()


# LVO: twice in-plane, six times along z. The slab MIP keeps a 2-4 mm vessel at full
# brightness only if it is not averaged away first: M1 runs in the axial plane, so z
# averaging stops at ~2 mm (a 0.6 mm CTA of 400 slices: 3 slices), not at ~5 mm.
LVO_WORKING_GRID: tuple[int, int, int] = (192, 192, 192)


def lvo_pooling(
    shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float]
) -> tuple[int, int, int]:
    """The LVO model's loader pooling (see LVO_WORKING_GRID)."""
    return pool_to(LVO_WORKING_GRID, shape_zyx)
