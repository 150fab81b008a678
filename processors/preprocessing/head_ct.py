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

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.transforms import CropForeground, Resize, SpatialPad
from scipy import ndimage

from processors.localisation import PlaneField, SliceCrop

if TYPE_CHECKING:
    from processors.dicom_volume import Volume
from processors.preprocessing.common import (
    ANTI_ALIAS_FROM,
    BONE_STRUCTURE,
    WINDOW_SLAB,
    check_mask,
    pool_to,
    resize_anti_aliased,
    validated,
    window,
)

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


_blood_window = window(ICH_WINDOW_HU)
_narrow_window = window(ICH_BLOOD_WINDOW_HU)
_bone_window = window(ICH_BONE_WINDOW_HU)
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


# ICH: twice the model grid per axis. The final resize still shrinks by up to 2x (anti-aliased,
# at the working grid: cheap), so the model sees averaged noise, as before.
ICH_WORKING_GRID: tuple[int, int, int] = (64, 192, 192)


def ich_pooling(
    shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float]
) -> tuple[int, int, int]:
    """The ICH model's loader pooling (see ICH_WORKING_GRID); spacing does not matter to it."""
    return pool_to(ICH_WORKING_GRID, shape_zyx)


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
    check_mask(mask, hu, "volume")
    x, m, _, _ = _head_ct(hu, spacing_zyx, mask)
    assert m is not None
    return x, m


def _head_ct(
    volume: Volume | np.ndarray, spacing_zyx: Sequence[float] | None, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, SliceCrop, PlaneField]:
    hu, spacing = validated(volume, spacing_zyx)
    bone = ndimage.binary_dilation(hu > BONE_HU, structure=BONE_STRUCTURE)
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
        x = resize_anti_aliased(x, ICH_INPUT_SHAPE[1:]) if shrink >= ANTI_ALIAS_FROM else _resize(x)
    # Interpolation can overshoot [0, 1] by rounding error only; clip so the contract holds exactly.
    out = np.clip(np.asarray(torch.as_tensor(x), dtype=np.float32), 0.0, 1.0)
    n = ICH_INPUT_SHAPE[0]
    return np.ascontiguousarray(out[:n]), (out[n] if mask is not None else None), crop, field
