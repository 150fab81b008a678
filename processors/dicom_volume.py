"""DICOM series → volume in Hounsfield units, ordered by position, not by file or instance number.

Pure: paths in, a `Volume` out, or a `VolumeError` that says what is wrong with the
series in words an integration engineer can act on. Slices are sorted by the
projection of ImagePositionPatient on the slice normal (the cross product of the
ImageOrientationPatient row and column directions): InstanceNumber and file order are
whatever the sender chose and must not be trusted for geometry.
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
ORIENTATION_TOLERANCE = 1e-4
# A gap this many times the typical slice spacing means slices are missing: resampling
# across it would silently distort the anatomy, so the series is refused instead.
MAX_GAP_RATIO = 1.5


class VolumeError(ValueError):
    """The instances do not form one loadable volume."""


@dataclass(frozen=True)
class Volume:
    hu: np.ndarray  # (z, y, x) float32, ordered along the slice normal
    spacing_zyx: tuple[float, float, float]  # mm: slice spacing from positions, then PixelSpacing
    study_uid: str
    series_uid: str
    n_instances: int
    # Per slice of `hu`, in its order: the position along the slice normal (mm; for an axial
    # series the patient z) and the instance's InstanceNumber (None where the sender left
    # it empty) — what turns a slice index back into something a viewer shows.
    positions_mm: tuple[float, ...] = ()
    instance_numbers: tuple[int | None, ...] = ()


@dataclass(frozen=True)
class _Slice:
    position: float  # mm along the slice normal
    hu: np.ndarray
    instance_number: int | None = None


def _instance_number(ds: Dataset) -> int | None:
    """InstanceNumber (type 2: may be empty or, from a careless sender, not a number)."""
    try:
        value = ds.get("InstanceNumber")
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _read(path: Path) -> Dataset:
    try:
        return dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise VolumeError(f"{Path(path).name}: not a readable DICOM file ({exc})") from exc


def _floats(ds: Dataset, keyword: str, count: int, name: str) -> np.ndarray:
    """A multi-valued numeric attribute, or a `VolumeError` naming what is missing or malformed."""
    value = ds.get(keyword)
    if value is None or value == "":
        raise VolumeError(f"{name}: no {keyword} (missing geometry)")
    try:
        out = np.array([float(v) for v in (value if isinstance(value, Sequence | np.ndarray) else [value])])
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{name}: {keyword} is not numeric ({value!r})") from exc
    if out.shape != (count,) or not np.all(np.isfinite(out)):
        raise VolumeError(f"{name}: {keyword} must have {count} finite values, got {list(value)}")
    return out


def _rescale(ds: Dataset, name: str) -> tuple[float, float]:
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{name}: RescaleSlope/RescaleIntercept are not numeric") from exc
    return slope, intercept


def load_series(paths: Sequence[Path]) -> Volume:
    """Load one CT series as a (z, y, x) float32 HU volume sorted along the slice normal.

    Raises `VolumeError` when the files do not form one volume: unreadable files,
    instances without pixel data, more than one series, missing or inconsistent
    geometry (orientation, position, pixel spacing, image size), duplicate positions
    or missing slices.
    """
    if not paths:
        raise VolumeError("no instances")
    datasets = [(_read(Path(p)), Path(p).name) for p in paths]

    series = {str(ds.get("SeriesInstanceUID", "")) for ds, _ in datasets}
    if len(series) != 1:
        raise VolumeError(f"instances belong to {len(series)} series; a volume is one series")
    for ds, name in datasets:
        if "PixelData" not in ds:
            sop = ds.get("SOPClassUID")
            kind = f" ({sop.name})" if sop is not None and hasattr(sop, "name") else ""
            raise VolumeError(f"{name}: no pixel data{kind}; not an image instance")

    first, first_name = datasets[0]
    iop = _floats(first, "ImageOrientationPatient", 6, first_name)
    row_dir, col_dir = iop[:3], iop[3:]
    if not (
        np.isclose(np.linalg.norm(row_dir), 1.0, atol=1e-3)
        and np.isclose(np.linalg.norm(col_dir), 1.0, atol=1e-3)
        and abs(float(np.dot(row_dir, col_dir))) < 1e-3
    ):
        raise VolumeError(f"{first_name}: ImageOrientationPatient rows/columns are not orthonormal")
    normal = np.cross(row_dir, col_dir)
    pixel_spacing = _floats(first, "PixelSpacing", 2, first_name)
    if np.any(pixel_spacing <= 0):
        raise VolumeError(f"{first_name}: PixelSpacing must be positive, got {list(pixel_spacing)}")

    slices: list[_Slice] = []
    shape: tuple[int, int] | None = None
    for ds, name in datasets:
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, name), iop, atol=ORIENTATION_TOLERANCE):
            raise VolumeError(f"{name}: orientation differs from the rest of the series")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, name), pixel_spacing, rtol=1e-4):
            raise VolumeError(f"{name}: PixelSpacing differs from the rest of the series")
        position = float(np.dot(normal, _floats(ds, "ImagePositionPatient", 3, name)))
        try:
            size = (int(ds.Rows), int(ds.Columns))
        except (AttributeError, TypeError, ValueError):
            raise VolumeError(f"{name}: no Rows/Columns") from None
        if shape is None:
            shape = size
        elif size != shape:
            raise VolumeError(
                f"{name}: image size {size[0]}x{size[1]} differs from {shape[0]}x{shape[1]} (mixed sizes)"
            )
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # pydicom raises many types for truncated or undecodable pixel data
            raise VolumeError(f"{name}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
        if pixels.shape != shape:
            raise VolumeError(f"{name}: multi-frame or malformed pixel data {pixels.shape}, expected {shape}")
        slope, intercept = _rescale(ds, name)
        hu = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        slices.append(_Slice(position, hu, _instance_number(ds)))

    slices.sort(key=lambda s: s.position)
    positions = np.array([s.position for s in slices])
    gaps = np.diff(positions)
    if np.any(gaps < POSITION_TOLERANCE_MM):
        k = int(np.argmin(gaps))
        raise VolumeError(
            f"two instances share one slice position ({positions[k]:.3f} mm along the normal): "
            "duplicate instances or mixed acquisitions"
        )
    if len(gaps):
        dz = float(np.median(gaps))
        if gaps.max() > MAX_GAP_RATIO * dz:
            raise VolumeError(
                f"slice gap of {gaps.max():.2f} mm where spacing is {dz:.2f} mm: slices are missing"
            )
    else:
        # One slice: no positions to measure; the nominal thickness is the best available.
        dz = float(first.get("SliceThickness", 1.0) or 1.0)
    return Volume(
        hu=np.stack([s.hu for s in slices]).astype(np.float32, copy=False),
        spacing_zyx=(dz, float(pixel_spacing[0]), float(pixel_spacing[1])),
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=next(iter(series)),
        n_instances=len(slices),
        positions_mm=tuple(float(p) for p in positions),
        instance_numbers=tuple(s.instance_number for s in slices),
    )
