"""A series' pixels, slice by slice, into one preallocated (optionally pooled) float32 HU
array: memory bounded by the output, not the series (processors/dicom_volume.py).

Each slice (or frame) is decoded from its file alone, in sorted order, through pydicom's
pixel handlers and the pylibjpeg plug-ins (Deflated only by inflating the whole file);
pooled in-plane by integer factors and along z by averaging groups of consecutive
slices, RescaleSlope/Intercept applied per slice (they may differ) to the pooled values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.pixels import pixel_array

from processors.dicom_headers import VolumeError

# (series shape, spacing) -> integer (z, y, x) pooling factors: how coarse a working grid a
# model's preprocessing can take (processors.preprocessing declares one per model).
Pooling = Callable[[tuple[int, int, int], tuple[float, float, float]], tuple[int, int, int]]


@dataclass(frozen=True)
class SliceRecord:
    """One slice of the series, from its header: where it is and how to decode it."""

    position: float  # mm along the slice normal
    origin: tuple[float, float, float]  # ImagePositionPatient
    name: str  # file name (and frame), for messages
    path: Path
    frame: int | None  # frame index of a multi-frame instance; None: a single-frame instance
    instance_number: int | None
    slope: float
    intercept: float
    deflated: bool  # Deflated Explicit VR: pixel data is only reachable by inflating the file


def pool_factors(
    pool: Pooling | None, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[int, int, int]:
    if pool is None:
        return (1, 1, 1)
    factors = pool(shape, spacing)
    if len(factors) != 3 or any(int(f) != f or f < 1 for f in factors):
        raise ValueError(f"pooling factors must be three integers >= 1, got {factors}")
    # Never pool an axis below one voxel.
    return (
        min(int(factors[0]), shape[0]),
        min(int(factors[1]), shape[1]),
        min(int(factors[2]), shape[2]),
    )


def decode(image: SliceRecord, shape: tuple[int, int]) -> np.ndarray:
    """One slice's stored values (its own integer dtype), decoded from the file alone."""
    try:
        if image.deflated:
            # The whole dataset is deflated: only inflating it reaches the pixel data.
            src: Any = dcmread(image.path)
        else:
            src = image.path  # pydicom reads just the pixel data (and one frame of it)
        pixels = pixel_array(src, index=image.frame)
    except Exception as exc:  # pydicom raises many types for truncated or undecodable pixel data
        raise VolumeError(
            f"{image.name}: pixel data cannot be decoded ({type(exc).__name__}: {exc})"
        ) from exc
    if pixels.shape != shape:
        raise VolumeError(
            f"{image.name}: multi-frame or malformed pixel data {pixels.shape}, expected {shape}"
        )
    return pixels


def pooled_hu(pixels: np.ndarray, ky: int, kx: int, slope: float, intercept: float) -> np.ndarray:
    """A slice's stored values → HU, area-averaged over ky x kx blocks (rows and columns
    past the last whole block are dropped: a few pixels of the field's edge)."""
    if ky == 1 and kx == 1:
        values = pixels.astype(np.float32)
    else:
        rows, cols = (pixels.shape[0] // ky) * ky, (pixels.shape[1] // kx) * kx
        blocks = pixels[:rows, :cols].reshape(rows // ky, ky, cols // kx, kx)
        # float32 sums of at most a few hundred 16-bit values are exact: no float64 needed.
        values = blocks.sum(axis=(1, 3), dtype=np.float32) / np.float32(ky * kx)
    return values * np.float32(slope) + np.float32(intercept)


def read_pixels(images: list[SliceRecord], shape: tuple[int, int], k_zyx: tuple[int, int, int]) -> np.ndarray:
    """Decode slice by slice, in order, into one preallocated (pooled) float32 HU array."""
    kz, ky, kx = k_zyx
    n = len(images)
    # z groups: consecutive slices [g kz, (g + 1) kz); the last takes what is left.
    n_out = -(-n // kz)
    hu = np.empty((n_out, shape[0] // ky, shape[1] // kx), dtype=np.float32)
    for i, image in enumerate(images):
        values = pooled_hu(decode(image, shape), ky, kx, image.slope, image.intercept)
        g, member = divmod(i, kz)
        if member == 0:
            hu[g] = values
        else:
            hu[g] += values
    if kz > 1:
        for g in range(n_out):
            count = min(kz, n - g * kz)
            if count > 1:
                hu[g] /= np.float32(count)
    return hu
