"""DICOM series → volume in Hounsfield units, ordered by position, not by file or instance number.

Pure: paths in, a `Volume` out, or a `VolumeError` that says what is wrong with the
series in words an integration engineer can act on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

# Slices closer than this along the normal are the same position (duplicates).
POSITION_TOLERANCE_MM = 1e-3


class VolumeError(ValueError):
    """The instances do not form one loadable volume."""


@dataclass(frozen=True)
class Volume:
    hu: np.ndarray  # (z, y, x) float32, ordered along the slice normal
    spacing_zyx: tuple[float, float, float]
    study_uid: str
    series_uid: str
    n_instances: int


def _read(path: Path) -> Dataset:
    try:
        return dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise VolumeError(f"{path.name}: not a readable DICOM file ({exc})") from exc


def load_series(paths: Sequence[Path]) -> Volume:
    if not paths:
        raise VolumeError("no instances")
    datasets = [(_read(p), p) for p in paths]
    series = {str(ds.get("SeriesInstanceUID", "")) for ds, _ in datasets}
    if len(series) != 1:
        raise VolumeError(f"instances belong to {len(series)} series; a volume is one series")
    first = datasets[0][0]
    try:
        iop = np.array([float(v) for v in first.ImageOrientationPatient])
    except AttributeError:
        raise VolumeError(f"{datasets[0][1].name}: no ImageOrientationPatient") from None
    normal = np.cross(iop[:3], iop[3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise VolumeError("ImageOrientationPatient rows/columns are not orthonormal")

    slices: list[tuple[float, np.ndarray]] = []
    shape = None
    for ds, path in datasets:
        if "PixelData" not in ds:
            raise VolumeError(f"{path.name}: no pixel data")
        if "ImagePositionPatient" not in ds:
            raise VolumeError(f"{path.name}: no ImagePositionPatient")
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-4):
            raise VolumeError(f"{path.name}: orientation differs from the rest of the series")
        if shape is None:
            shape = (int(ds.Rows), int(ds.Columns))
        elif (int(ds.Rows), int(ds.Columns)) != shape:
            raise VolumeError(f"{path.name}: {ds.Rows}x{ds.Columns} differs from {shape[0]}x{shape[1]}")
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # pydicom raises many types for undecodable pixel data
            raise VolumeError(f"{path.name}: pixel data cannot be decoded ({exc})") from exc
        if pixels.shape != shape:
            raise VolumeError(f"{path.name}: multi-frame or malformed pixel data {pixels.shape}")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        position = float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))
        slices.append((position, pixels * slope + intercept))

    slices.sort(key=lambda s: s[0])
    positions = np.array([s[0] for s in slices])
    gaps = np.diff(positions)
    if np.any(gaps < POSITION_TOLERANCE_MM):
        raise VolumeError("two instances share one slice position (duplicate or mixed acquisitions)")
    dz = float(np.median(gaps)) if len(gaps) else float(first.get("SliceThickness", 1.0) or 1.0)
    row_mm, col_mm = (float(v) for v in first.get("PixelSpacing", [1.0, 1.0]))
    return Volume(
        hu=np.stack([s[1] for s in slices]).astype(np.float32),
        spacing_zyx=(dz, row_mm, col_mm),
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=next(iter(series)),
        n_instances=len(slices),
    )
