"""DICOM series → volume in Hounsfield units, ordered by position, not by file or instance number.

Pure: paths in, a `Volume` out, or a `VolumeError` that says what is wrong with the
series in words an integration engineer can act on. Slices are sorted by the
projection of ImagePositionPatient on the slice normal (the cross product of the
ImageOrientationPatient row and column directions): InstanceNumber and file order are
whatever the sender chose and must not be trusted for geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
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
    # Voxel index (z, y, x, 1) of `hu` -> DICOM patient coordinates (x, y, z, 1) in mm (LPS),
    # 4 x 4 float64: what places a finding in the patient (a nodule's centre), not only on a
    # slice. Columns: slice step (normal x slice spacing), row step (column direction cosines
    # x row spacing), column step (row direction cosines x column spacing), first slice's
    # ImagePositionPatient. None for a volume not made by `load_series`.
    affine: np.ndarray | None = field(default=None, compare=False, repr=False)

    def to_patient(self, index_zyx: np.ndarray | Sequence[float]) -> np.ndarray:
        """Patient (x, y, z) mm of voxel indices (..., 3 as z, y, x; fractional is fine)."""
        if self.affine is None:
            raise ValueError("this volume carries no patient geometry (not loaded by load_series)")
        return voxel_to_patient(self.affine, index_zyx)


def voxel_to_patient(affine: np.ndarray, index_zyx: np.ndarray | Sequence[float]) -> np.ndarray:
    """Apply a (z, y, x) index -> patient (x, y, z) mm affine to (..., 3) indices."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4 x 4, got {a.shape}")
    idx = np.asarray(index_zyx, dtype=np.float64)
    if idx.shape[-1:] != (3,):
        raise ValueError(f"indices must end in (z, y, x), got shape {idx.shape}")
    return idx @ a[:3, :3].T + a[:3, 3]


def series_affine(
    first_position: Sequence[float] | np.ndarray,
    orientation: Sequence[float] | np.ndarray,
    spacing_zyx: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """The (z, y, x) index -> patient (x, y, z) affine of an image stack: slice 0 at
    `first_position` (its ImagePositionPatient), ImageOrientationPatient `orientation`
    (row direction, then column direction), slices along row x column."""
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    normal = np.cross(row_dir, col_dir)
    dz, dy, dx = (float(s) for s in spacing_zyx)
    a = np.eye(4)
    # Index z steps along the normal, y down the rows (column direction), x along a row.
    a[:3, 0], a[:3, 1], a[:3, 2] = normal * dz, col_dir * dy, row_dir * dx
    a[:3, 3] = np.asarray(first_position, float)
    return a


def centred_affine(shape_zyx: Sequence[int], spacing_zyx: Sequence[float]) -> np.ndarray:
    """The affine of an array as `models.dicom_writer.write_ct_series` writes it (axial, HFS
    identity orientation, the volume's centre at the patient origin): the geometry a plain
    HU array is given when it never went through DICOM (training phantoms)."""
    half = (np.asarray(shape_zyx[:3], float) - 1) / 2 * np.asarray(spacing_zyx, float)
    return series_affine((-half[2], -half[1], -half[0]), (1, 0, 0, 0, 1, 0), spacing_zyx)


@dataclass(frozen=True)
class _Slice:
    position: float  # mm along the slice normal
    hu: np.ndarray
    instance_number: int | None = None
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # ImagePositionPatient


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
        ipp = _floats(ds, "ImagePositionPatient", 3, name)
        position = float(np.dot(normal, ipp))
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
        origin = (float(ipp[0]), float(ipp[1]), float(ipp[2]))
        slices.append(_Slice(position, hu, _instance_number(ds), origin))

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
    spacing_zyx = (dz, float(pixel_spacing[0]), float(pixel_spacing[1]))
    return Volume(
        hu=np.stack([s.hu for s in slices]).astype(np.float32, copy=False),
        spacing_zyx=spacing_zyx,
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=next(iter(series)),
        n_instances=len(slices),
        positions_mm=tuple(float(p) for p in positions),
        instance_numbers=tuple(s.instance_number for s in slices),
        affine=series_affine(slices[0].origin, iop, spacing_zyx),
    )
