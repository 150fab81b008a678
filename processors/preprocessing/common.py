"""What every model's preprocessing shares: display windows, the memory-lean anti-aliased
resize, the checks a CT volume and a training mask must pass, the loader's working-grid
pooling (processors/dicom_volume.load_series(pool=...)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.networks.layers import GaussianFilter
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import ScaleIntensityRange
from scipy import ndimage

if TYPE_CHECKING:
    from processors.dicom_volume import Volume


def window(hu: tuple[float, float]) -> ScaleIntensityRange:
    """A display window: `hu` (low, high) onto [0, 1], clipped outside."""
    return ScaleIntensityRange(a_min=hu[0], a_max=hu[1], b_min=0.0, b_max=1.0, clip=True)


def resize_anti_aliased(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
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
def pool_to(grid: Sequence[int], shape: Sequence[int]) -> tuple[int, int, int]:
    k = [max(1, -(-int(n) // int(g))) for n, g in zip(shape, grid, strict=True)]
    return (k[0], k[1], k[2])


def check_mask(mask: np.ndarray, image: np.ndarray, what: str) -> None:
    """A training mask must lie on the image it marks, voxel for voxel."""
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from {what} shape {image.shape}")


def validated(
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


def resize_2d(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(C, H, W) → (C, *size): area averaging when shrinking along both axes (a detector
    image is averaged down, not aliased), bilinear otherwise."""
    if all(n >= g for n, g in zip(x.shape[1:], size, strict=True)):
        return torch.nn.functional.interpolate(x[None], size=tuple(size), mode="area")[0]
    return torch.nn.functional.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


# One voxel in-plane (diagonals too) and one slice up and down. In-plane that is the rim the
# blur leaves; along z it is the vertex, where the skull runs parallel to the slices.
BONE_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
BONE_STRUCTURE[1] = True
BONE_STRUCTURE[:, 1, 1] = True
