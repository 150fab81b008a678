"""The one preprocessing of each model, shared by training and serving (no train/serve skew).

`models/ich_classifier/train.py` trains on exactly what `preprocess_head_ct` returns, and the
inference path (`processors/model_inputs.py`) sends exactly that to Triton.

Head CT for ICH, as MONAI transforms on a (channel, z, y, x) array:

1. Bone and its partial-volume rim (> 150 HU, dilated one voxel) are removed from the
   soft-tissue channels. Without that strip the inner table's blur (bone averaged with
   CSF gives 60-150 HU) looks exactly like a thin subdural, and the skull saturates
   every brain window.
2. Three channels, as a radiologist reads a head CT with several windows:
   * 0 — brain window 0-100 HU: CSF ~0.05, parenchyma ~0.3, acute blood 0.55-0.9;
   * 1 — narrow blood window 40-80 HU: parenchyma ~0, acute blood 0.3-1. The network
     gets "hyperdense" as an explicit signal instead of having to carve it out of the
     brain window; with it, training on the same CPU budget went from AUC ~0.92 to
     > 0.99 on held-out phantoms (small bleeds especially);
   * 2 — bone window 100-1500 HU, unstripped, so the network still knows where the
     inner table is (a subdural lies against it) and can discount what is left of the rim.
3. Crop to the head (foreground in any channel) and pad the in-plane box square in mm,
   so head size, position and field of view matter less and the aspect is kept.
4. Resize to a fixed grid, anti-aliased when shrinking by 1.5x or more (thin-slice or
   512 x 512 series average their noise instead of aliasing it).

Why ICH_INPUT_SHAPE = (3, 32, 96, 96): 96 voxels across a ~200 mm head is ~2 mm
in-plane, about the native resolution of the phantoms and enough for a 3.5 mm-radius
haematoma to span 3-4 voxels; 32 slices over ~140 mm is 4-5 mm, the thickness routine
head CT is read at, so nothing is thrown away along z. ~0.9 M input values keep a
batch-1 forward pass of the reference network in tens of milliseconds on one CPU core.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.networks.layers import GaussianFilter
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import CropForeground, Resize, ScaleIntensityRange, SpatialPad
from scipy import ndimage

from processors.birads import VIEWS as MAMMO_VIEWS
from processors.localisation import PlaneField, SliceCrop

if TYPE_CHECKING:
    from processors.dicom_volume import Volume
    from processors.mammogram import Mammogram

ICH_INPUT_SHAPE: tuple[int, int, int, int] = (3, 32, 96, 96)  # (C, D, H, W)
# Brain window. Acute blood is 50-90 HU, parenchyma 20-45, CSF 0-10.
ICH_WINDOW_HU = (0.0, 100.0)
# Narrow blood window: parenchyma is ~0, acute blood 0.3-1.
ICH_BLOOD_WINDOW_HU = (40.0, 80.0)
ICH_BONE_WINDOW_HU = (100.0, 1500.0)
# Above this is bone (or its blurred edge), never blood: acute clot tops out near 90 HU and
# noise adds a few tens at most. The mask is dilated one voxel to take the edge with it.
BONE_HU = 150.0
# What counts as head when cropping: anything denser than fat-free air in either channel.
FOREGROUND_LEVEL = 0.02


def _window(hu: tuple[float, float]) -> ScaleIntensityRange:
    """A display window: `hu` (low, high) onto [0, 1], clipped outside."""
    return ScaleIntensityRange(a_min=hu[0], a_max=hu[1], b_min=0.0, b_max=1.0, clip=True)


_blood_window = _window(ICH_WINDOW_HU)
_narrow_window = _window(ICH_BLOOD_WINDOW_HU)
_bone_window = _window(ICH_BONE_WINDOW_HU)
# The crop box comes from the image channels only (a training mask rides along, never steers).
_crop = CropForeground(
    select_fn=lambda x: x > FOREGROUND_LEVEL,
    channel_indices=tuple(range(ICH_INPUT_SHAPE[0])),
    margin=2,
    allow_smaller=True,
)
# The same box as `_crop`'s, computed on the any-channel foreground map.
_crop_box = CropForeground(select_fn=lambda x: x > 0, margin=2, allow_smaller=True)
_resize = Resize(spatial_size=ICH_INPUT_SHAPE[1:], mode="trilinear", align_corners=False)
_resize_smoothed = Resize(
    spatial_size=ICH_INPUT_SHAPE[1:], mode="trilinear", align_corners=False, anti_aliasing=True
)


def _resize_anti_aliased(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """MONAI's `Resize(size, "trilinear", anti_aliasing=True)`: the same Gaussian kernels
    (sigma (factor - 1) / 2 per shrunk axis, erf-sampled, truncated at 4 sigma, zero outside
    the volume), then the same interpolation, one channel and one axis at a time. MONAI pads
    every axis of every channel before its first convolution and convolves by im2col (kernel
    width x the volume): on a working-grid head CT that was 10x the input (~440 MB); here it
    is about two channel-sized buffers. Equal to `_resize_smoothed` to float rounding (scipy
    accumulates in float64, torch's convolution in float32); tested."""
    shape = torch.Tensor(list(x.shape[1:]))
    factors = torch.div(shape, torch.Tensor(list(size)))
    sigmas = torch.maximum(torch.zeros(factors.shape), (factors - 1) / 2).tolist()
    smooth = GaussianFilter(spatial_dims=len(size), sigma=sigmas)
    kernels = [
        gaussian_1d(s, truncated=smooth.truncated, approx=smooth.approx).numpy().astype(np.float64)
        for s in smooth.sigma
    ]
    out = []
    for c in range(x.shape[0]):
        y = np.array(torch.as_tensor(x[c]).numpy(), dtype=np.float32)  # a copy: filtered in place below
        for axis, kernel in enumerate(kernels):
            if kernel.size == 1 and kernel[0] == 1:
                continue  # MONAI skips unity kernels too
            ndimage.correlate1d(y, kernel, axis=axis, output=y, mode="constant", cval=0.0)
        out.append(
            torch.nn.functional.interpolate(
                torch.from_numpy(y)[None, None], size=tuple(size), mode="trilinear", align_corners=False
            )[0]
        )
        del y
    return torch.cat(out)


# Slices per slab when windowing: large enough that the per-call overhead does not show,
# small enough that the temporaries are a few MB.
WINDOW_SLAB = 8
# Below this shrink factor the anti-aliasing sigma ((factor - 1) / 2 voxels) is too small to
# matter but the Gaussian still costs as much as the rest of the preprocessing together.
ANTI_ALIAS_FROM = 1.5
# One voxel in-plane (diagonals too) and one slice up and down. In-plane that is the rim the
# blur leaves; along z it is the vertex, where the skull runs parallel to the slices.
_BONE_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_BONE_STRUCTURE[1] = True
_BONE_STRUCTURE[:, 1, 1] = True

# --- Working grids: how coarse a volume each model's preprocessing can start from ------------
#
# A scanner's 0.6 mm, 512 x 512 series is ~10x finer per axis than the models' grids; reading
# it at full resolution cost 17.9 GB for a 240-slice head (issue 16). So each CT model
# declares the pooling the loader may apply (processors.dicom_volume.load_series(pool=...)):
# integer area-averaging factors, k = ceil(n / working grid) per axis, so the volume it
# starts from is at most the working grid and (for n >= the working grid) at least half of
# it. A series at or below the working grid (every training phantom) is read at full
# resolution: exactly the path the models were trained on.
#
# Why ceil and not floor: floor(n / (2 x grid)) leaves anything from 2x to 4x the grid (a
# 120-slice head kept all 120 slices: 1.10 GB peak, 0.28 GB above the imports, more than
# the 240-slice series); ceil keeps 1-2x, and so time and memory follow the model's grid.
#
# ICH: twice the model grid per axis. The final resize still shrinks by up to 2x (anti-aliased,
# at the working grid: cheap), so the model sees averaged noise, as before.
ICH_WORKING_GRID: tuple[int, int, int] = (64, 192, 192)
# LVO: twice in-plane, six times along z. The slab MIP keeps a 2-4 mm vessel at full
# brightness only if it is not averaged away first: M1 runs in the axial plane, so z
# averaging stops at ~2 mm (a 0.6 mm CTA of 400 slices: 3 slices), not at ~5 mm.
LVO_WORKING_GRID: tuple[int, int, int] = (192, 192, 192)
# Chest CT: the nodule preprocessing box-averages to its 2.5 mm grid anyway; on axes longer
# than this the loader does that averaging (by the same integer kernel) instead of it.
NODULE_FULL_RESOLUTION_MAX = 256


def _pool_to(grid: Sequence[int], shape: Sequence[int]) -> tuple[int, int, int]:
    k = [max(1, -(-int(n) // int(g))) for n, g in zip(shape, grid, strict=True)]
    return (k[0], k[1], k[2])


def ich_pooling(
    shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float]
) -> tuple[int, int, int]:
    """The ICH model's loader pooling (see ICH_WORKING_GRID); spacing does not matter to it."""
    return _pool_to(ICH_WORKING_GRID, shape_zyx)


def lvo_pooling(
    shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float]
) -> tuple[int, int, int]:
    """The LVO model's loader pooling (see LVO_WORKING_GRID)."""
    return _pool_to(LVO_WORKING_GRID, shape_zyx)


def preprocess_head_ct(volume: Volume | np.ndarray, spacing_zyx: Sequence[float] | None = None) -> np.ndarray:
    """A head CT in HU, (z, y, x) → float32 array of ICH_INPUT_SHAPE with values in [0, 1].

    `volume` is a `processors.dicom_volume.Volume` (its spacing is used) or a plain HU
    array with `spacing_zyx` in mm. Slices must be ordered along the slice normal (as
    `load_series` returns them); spacing is validated and used to keep the in-plane
    aspect, the rest of the geometry is normalised away by crop and resize.
    """
    x, _, _, _ = _head_ct(volume, spacing_zyx, None)
    return x


def preprocess_head_ct_with_crop(
    volume: Volume | np.ndarray, spacing_zyx: Sequence[float] | None = None
) -> tuple[np.ndarray, SliceCrop]:
    """`preprocess_head_ct`'s input (the same array) and the slices of `volume` it covers:
    what maps the ICH model's localisation back to the series' slices."""
    x, _, crop, _ = _head_ct(volume, spacing_zyx, None)
    return x, crop


def preprocess_head_ct_with_field(
    volume: Volume | np.ndarray, spacing_zyx: Sequence[float] | None = None
) -> tuple[np.ndarray, SliceCrop, PlaneField]:
    """`preprocess_head_ct_with_crop` and the in-plane field of `volume`'s pixels the input
    covers: what maps the ICH blood map's cells back onto the series' pixels (the SEG)."""
    x, _, crop, field = _head_ct(volume, spacing_zyx, None)
    return x, crop, field


def preprocess_head_ct_with_mask(
    hu: np.ndarray, spacing_zyx: Sequence[float], mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Training only: the model input exactly as `preprocess_head_ct` makes it, plus a voxel
    mask (e.g. where the phantom has blood) carried through the same crop, pad and resize,
    as a (D, H, W) float32 fraction in [0, 1]. Mask voxels removed by the bone strip are
    dropped: the model cannot see them."""
    _check_mask(mask, hu, "volume")
    x, m, _, _ = _head_ct(hu, spacing_zyx, mask)
    assert m is not None
    return x, m


def _check_mask(mask: np.ndarray, image: np.ndarray, what: str) -> None:
    """A training mask must lie on the image it marks, voxel for voxel."""
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from {what} shape {image.shape}")


def _validated(
    volume: Volume | np.ndarray, spacing_zyx: Sequence[float] | None
) -> tuple[np.ndarray, tuple[float, ...]]:
    """The HU array (float32) and its (z, y, x) spacing in mm, checked as every CT model needs them."""
    if isinstance(volume, np.ndarray):
        hu = volume
        if spacing_zyx is None:
            raise ValueError("spacing_zyx is required with a plain array")
        spacing = tuple(float(s) for s in spacing_zyx)
    else:
        hu = volume.hu
        spacing = tuple(float(s) for s in (spacing_zyx or volume.spacing_zyx))
    if hu.ndim != 3 or min(hu.shape) < 2:
        raise ValueError(f"expected a 3D volume with at least 2 voxels per axis, got shape {hu.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing_zyx must be three positive mm values, got {spacing_zyx}")
    hu = np.asarray(hu, dtype=np.float32)
    if not np.isfinite(hu).all():
        raise ValueError("volume contains NaN or infinity")
    return hu, spacing


def _head_ct(
    volume: Volume | np.ndarray, spacing_zyx: Sequence[float] | None, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, SliceCrop, PlaneField]:
    hu, spacing = _validated(volume, spacing_zyx)
    bone = ndimage.binary_dilation(hu > BONE_HU, structure=_BONE_STRUCTURE)
    # The windows are per voxel: computed a slab of slices at a time straight into the one
    # (C, z, y, x) array, they are the same values without MONAI's full-size temporaries
    # (~6 volumes per window) or a stacked copy (issue 16).
    x_np = np.empty((ICH_INPUT_SHAPE[0] + (mask is not None), *hu.shape), dtype=np.float32)
    for z0 in range(0, hu.shape[0], WINDOW_SLAB):
        z = slice(z0, z0 + WINDOW_SLAB)
        blood = np.where(bone[z], ICH_WINDOW_HU[0], hu[z])
        x_np[0, z] = np.asarray(_blood_window(blood))
        x_np[1, z] = np.asarray(_narrow_window(blood))
        x_np[2, z] = np.asarray(_bone_window(hu[z]))
        if mask is not None:
            # Only what the model can see: blood lost in the bone strip is no target for it.
            x_np[3, z] = mask[z].astype(bool) & ~bone[z]
    del bone
    x = torch.from_numpy(x_np)
    with torch.no_grad():
        # _crop(x), with the box kept: its z extent maps model slices back to the series.
        # The box of the voxels foreground in any channel, found on that one boolean map
        # (MONAI would first copy the channels: a transient volume per channel).
        foreground = np.zeros(hu.shape, dtype=bool)
        for c in range(ICH_INPUT_SHAPE[0]):
            foreground |= x_np[c] > FOREGROUND_LEVEL
        box_start, box_end = _crop_box.compute_bounding_box(torch.from_numpy(foreground)[None])
        del foreground
        x = _crop.crop_pad(x, box_start, box_end)
        # allow_smaller: the box never leaves the volume, so [start, end) are its slices.
        crop = SliceCrop(int(box_start[0]), int(box_end[0]), ICH_INPUT_SHAPE[1])
        # Square in-plane field (in mm) so a round haematoma stays round whatever the head's shape.
        rows_mm, cols_mm = x.shape[2] * spacing[1], x.shape[3] * spacing[2]
        side_mm = max(rows_mm, cols_mm)
        target = (-1, round(side_mm / spacing[1]), round(side_mm / spacing[2]))
        # SpatialPad pads symmetrically (the smaller half before): the padded field starts
        # that far before the box. The resize maps the field's edges onto the input's.
        rows_before = max(target[1] - x.shape[2], 0) // 2
        cols_before = max(target[2] - x.shape[3], 0) // 2
        row0, col0 = int(box_start[1]) - rows_before, int(box_start[2]) - cols_before
        field = PlaneField(row0, row0 + max(target[1], x.shape[2]), col0, col0 + max(target[2], x.shape[3]))
        x = SpatialPad(spatial_size=target, mode="constant")(x)
        shrink = max(n / m for n, m in zip(x.shape[1:], ICH_INPUT_SHAPE[1:], strict=True))
        x = _resize_anti_aliased(x, ICH_INPUT_SHAPE[1:]) if shrink >= ANTI_ALIAS_FROM else _resize(x)
    # Interpolation can overshoot [0, 1] by rounding error only; clip so the contract holds exactly.
    out = np.clip(np.asarray(torch.as_tensor(x), dtype=np.float32), 0.0, 1.0)
    n = ICH_INPUT_SHAPE[0]
    return np.ascontiguousarray(out[:n]), (out[n] if mask is not None else None), crop, field


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

_cta_vessel_window = _window(CTA_VESSEL_WINDOW_HU)
_cta_bone_window = _window(CTA_BONE_WINDOW_HU)


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
    _check_mask(mask, hu, "volume")
    x, m = _cta(hu, spacing_zyx, mask)
    assert m is not None
    return x, m


def _cta(
    volume: Volume | np.ndarray, spacing_zyx: Sequence[float] | None, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    hu, spacing = _validated(volume, spacing_zyx)
    # Crop to the body first (everything after is per voxel or per box, so cheaper on less).
    body = hu > BODY_HU
    if not body.any():
        raise ValueError(f"no body in the volume (nothing above {BODY_HU:g} HU)")
    box = []
    for axis in range(3):
        present = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(present[0]) - 2, 0), int(present[-1]) + 3))
    hu = hu[tuple(box)]
    bone = ndimage.binary_dilation(hu > CTA_BONE_HU, structure=_BONE_STRUCTURE, iterations=2)
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
    _check_mask(mask, pixels, "image")
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
        x = _resize_2d(x, CXR_INPUT_SHAPE[1:])
    out = np.clip(x.numpy().astype(np.float32), 0.0, 1.0)
    return np.ascontiguousarray(out[:1]), (out[1] if mask is not None else None)


def _resize_2d(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(C, H, W) → (C, *size): area averaging when shrinking along both axes (a detector
    image is averaged down, not aliased), bilinear otherwise."""
    if all(n >= g for n, g in zip(x.shape[1:], size, strict=True)):
        return torch.nn.functional.interpolate(x[None], size=tuple(size), mode="area")[0]
    return torch.nn.functional.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


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
        _check_mask(mask, pixels, "image")
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
        x = _resize_2d(x, size)
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
    _check_mask(mask, hu, "volume")
    x, m, geometry = _chest_ct(hu, spacing_zyx, mask)
    assert m is not None
    return x, m, geometry


def _chest_ct(
    volume: Volume | np.ndarray, spacing_zyx: Sequence[float] | None, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, NoduleGeometry]:
    from processors.dicom_volume import centred_affine
    from processors.nodules import NoduleGeometry

    hu, spacing = _validated(volume, spacing_zyx)
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
