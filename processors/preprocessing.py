"""The one preprocessing of each model, shared by training and serving (no train/serve skew).

`models/train_ich.py` trains on exactly what `preprocess_head_ct` returns, and the
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
from monai.transforms import CropForeground, Resize, ScaleIntensityRange, SpatialPad
from scipy import ndimage

if TYPE_CHECKING:
    from processors.dicom_volume import Volume

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

_blood_window = ScaleIntensityRange(
    a_min=ICH_WINDOW_HU[0], a_max=ICH_WINDOW_HU[1], b_min=0.0, b_max=1.0, clip=True
)
_narrow_window = ScaleIntensityRange(
    a_min=ICH_BLOOD_WINDOW_HU[0], a_max=ICH_BLOOD_WINDOW_HU[1], b_min=0.0, b_max=1.0, clip=True
)
_bone_window = ScaleIntensityRange(
    a_min=ICH_BONE_WINDOW_HU[0], a_max=ICH_BONE_WINDOW_HU[1], b_min=0.0, b_max=1.0, clip=True
)
# The crop box comes from the image channels only (a training mask rides along, never steers).
_crop = CropForeground(
    select_fn=lambda x: x > FOREGROUND_LEVEL,
    channel_indices=tuple(range(ICH_INPUT_SHAPE[0])),
    margin=2,
    allow_smaller=True,
)
_resize = Resize(spatial_size=ICH_INPUT_SHAPE[1:], mode="trilinear", align_corners=False)
_resize_smoothed = Resize(
    spatial_size=ICH_INPUT_SHAPE[1:], mode="trilinear", align_corners=False, anti_aliasing=True
)
# Below this shrink factor the anti-aliasing sigma ((factor - 1) / 2 voxels) is too small to
# matter but the Gaussian still costs as much as the rest of the preprocessing together.
ANTI_ALIAS_FROM = 1.5
# One voxel in-plane (diagonals too) and one slice up and down. In-plane that is the rim the
# blur leaves; along z it is the vertex, where the skull runs parallel to the slices.
_BONE_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_BONE_STRUCTURE[1] = True
_BONE_STRUCTURE[:, 1, 1] = True


def preprocess_head_ct(volume: Volume | np.ndarray, spacing_zyx: Sequence[float] | None = None) -> np.ndarray:
    """A head CT in HU, (z, y, x) → float32 array of ICH_INPUT_SHAPE with values in [0, 1].

    `volume` is a `processors.dicom_volume.Volume` (its spacing is used) or a plain HU
    array with `spacing_zyx` in mm. Slices must be ordered along the slice normal (as
    `load_series` returns them); spacing is validated and used to keep the in-plane
    aspect, the rest of the geometry is normalised away by crop and resize.
    """
    x, _ = _head_ct(volume, spacing_zyx, None)
    return x


def preprocess_head_ct_with_mask(
    hu: np.ndarray, spacing_zyx: Sequence[float], mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Training only: the model input exactly as `preprocess_head_ct` makes it, plus a voxel
    mask (e.g. where the phantom has blood) carried through the same crop, pad and resize,
    as a (D, H, W) float32 fraction in [0, 1]. Mask voxels removed by the bone strip are
    dropped: the model cannot see them."""
    if mask.shape != hu.shape:
        raise ValueError(f"mask shape {mask.shape} differs from volume shape {hu.shape}")
    x, m = _head_ct(hu, spacing_zyx, mask)
    assert m is not None
    return x, m


def _head_ct(
    volume: Volume | np.ndarray, spacing_zyx: Sequence[float] | None, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
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

    bone = ndimage.binary_dilation(hu > BONE_HU, structure=_BONE_STRUCTURE)
    blood = np.where(bone, ICH_WINDOW_HU[0], hu)
    channels = [
        np.asarray(_blood_window(blood)),
        np.asarray(_narrow_window(blood)),
        np.asarray(_bone_window(hu)),
    ]
    if mask is not None:
        # Only what the model can see: blood lost in the bone strip is no target for it.
        channels.append((mask.astype(bool) & ~bone).astype(np.float32))
    x = torch.from_numpy(np.stack(channels).astype(np.float32))
    with torch.no_grad():
        x = _crop(x)
        # Square in-plane field (in mm) so a round haematoma stays round whatever the head's shape.
        rows_mm, cols_mm = x.shape[2] * spacing[1], x.shape[3] * spacing[2]
        side_mm = max(rows_mm, cols_mm)
        target = (-1, round(side_mm / spacing[1]), round(side_mm / spacing[2]))
        x = SpatialPad(spatial_size=target, mode="constant")(x)
        shrink = max(n / m for n, m in zip(x.shape[1:], ICH_INPUT_SHAPE[1:], strict=True))
        x = (_resize_smoothed if shrink >= ANTI_ALIAS_FROM else _resize)(x)
    # Interpolation can overshoot [0, 1] by rounding error only; clip so the contract holds exactly.
    out = np.clip(np.asarray(torch.as_tensor(x), dtype=np.float32), 0.0, 1.0)
    n = ICH_INPUT_SHAPE[0]
    return np.ascontiguousarray(out[:n]), (out[n] if mask is not None else None)
