"""DICOM series → volume in Hounsfield units, ordered by position, not by file or instance number.

Pure: paths in, a `Volume` (processors/volume.py) out, or a `VolumeError` that says what is wrong with the
series in words an integration engineer can act on. Slices are sorted by the
projection of ImagePositionPatient on the slice normal (the cross product of the
ImageOrientationPatient row and column directions): InstanceNumber and file order are
whatever the sender chose and must not be trusted for geometry.

Memory is bounded by the output, not the series (issue 16: a 240 x 512 x 512 head CT
took 17.9 GB reading every file whole, converting each slice to float and stacking):

1. headers only (pixel data deferred, never read: processors/dicom_headers.py) to validate
   the geometry and sort the slices — a broken series is refused before a single pixel
   is decoded;
2. pixel data (processors/dicom_pixels.py) one slice (or frame) at a time, in sorted order, straight into one
   preallocated float32 array — optionally a coarser one: a model that needs no more
   than a given grid passes `pool`, and each slice is area-averaged in-plane by integer
   factors and groups of consecutive slices averaged along z, RescaleSlope/Intercept
   applied per slice (they may differ) to the pooled values. Averaging before the
   model's windows differs from averaging after them by less than the noise; it is what
   lets a 0.6 mm series be read in the memory of its 2 mm version.

Compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE) decode through
pydicom's pixel handlers and the pylibjpeg plug-ins; Deflated and Big Endian through
pydicom itself. Enhanced (multi-frame) CT/MR objects load frame by frame, their
geometry from the functional groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from processors import dicom_headers
from processors.dicom_headers import DEFER_BYTES as DEFER_BYTES
from processors.dicom_headers import HTJ2K_SYNTAXES as HTJ2K_SYNTAXES
from processors.dicom_headers import VolumeError as VolumeError
from processors.dicom_pixels import Pooling as Pooling
from processors.dicom_pixels import SliceRecord, pool_factors, read_pixels
from processors.volume import Volume as Volume
from processors.volume import centred_affine as centred_affine
from processors.volume import series_affine as series_affine
from processors.volume import voxel_to_patient as voxel_to_patient

# Slices closer than this along the normal are the same position (duplicates).
POSITION_TOLERANCE_MM = 1e-3
ORIENTATION_TOLERANCE = 1e-4
# A gap this many times the typical slice spacing means slices are missing: resampling
# across it would silently distort the anatomy, so the series is refused instead.
MAX_GAP_RATIO = 1.5


@dataclass(frozen=True)
class _SeriesGeometry:
    """What every slice of the series must share, taken from its first image."""

    study_uid: str
    series_uid: str
    iop: np.ndarray  # ImageOrientationPatient: row then column direction cosines
    normal: np.ndarray  # the slice normal (row x column)
    pixel_spacing: np.ndarray  # (row spacing, column spacing) mm
    nominal_dz: float  # SliceThickness: the spacing of a one-slice series


def _headers(paths: Sequence[Path]) -> tuple[list[tuple[Dataset, Path, str]], str]:
    """Every instance's header (pixels deferred) and the one series they form."""
    if not paths:
        raise VolumeError("no instances")
    headers = [(*dicom_headers.read_header(Path(p)), Path(p)) for p in paths]
    series = {str(ds.get("SeriesInstanceUID", "")) for ds, _, _ in headers}
    if len(series) != 1:
        raise VolumeError(f"instances belong to {len(series)} series; a volume is one series")
    for ds, has_pixels, path in headers:
        if not has_pixels:
            sop = ds.get("SOPClassUID")
            kind = f" ({sop.name})" if sop is not None and hasattr(sop, "name") else ""
            raise VolumeError(f"{path.name}: no pixel data{kind}; not an image instance")
    return [(ds, path, path.name) for ds, _, path in headers], next(iter(series))


def _geometry(first: Dataset, first_ds: Dataset, name: str, series_uid: str) -> _SeriesGeometry:
    iop = dicom_headers.floats(first, "ImageOrientationPatient", 6, name)
    row_dir, col_dir = iop[:3], iop[3:]
    if not (
        np.isclose(np.linalg.norm(row_dir), 1.0, atol=1e-3)
        and np.isclose(np.linalg.norm(col_dir), 1.0, atol=1e-3)
        and abs(float(np.dot(row_dir, col_dir))) < 1e-3
    ):
        raise VolumeError(f"{name}: ImageOrientationPatient rows/columns are not orthonormal")
    pixel_spacing = dicom_headers.floats(first, "PixelSpacing", 2, name)
    if np.any(pixel_spacing <= 0):
        raise VolumeError(f"{name}: PixelSpacing must be positive, got {list(pixel_spacing)}")
    return _SeriesGeometry(
        study_uid=str(first_ds.get("StudyInstanceUID", "")),
        series_uid=series_uid,
        iop=iop,
        normal=np.cross(row_dir, col_dir),
        pixel_spacing=pixel_spacing,
        nominal_dz=float(first.get("SliceThickness", 1.0) or 1.0),
    )


def _image(
    view: Dataset, path: Path, ds: Dataset, name: str, frame: int | None, geometry: _SeriesGeometry
) -> tuple[SliceRecord, tuple[int, int]]:
    """One slice's record (where it lies, how to decode and rescale it) and its size."""
    if frame is not None and frame < 0:
        raise VolumeError(
            f"{name}: {-frame} frames without per-frame positions (not an enhanced image); "
            "a volume needs one position per slice"
        )
    orientation = dicom_headers.floats(view, "ImageOrientationPatient", 6, name)
    if not np.allclose(orientation, geometry.iop, atol=ORIENTATION_TOLERANCE):
        raise VolumeError(f"{name}: orientation differs from the rest of the series")
    spacing = dicom_headers.floats(view, "PixelSpacing", 2, name)
    if not np.allclose(spacing, geometry.pixel_spacing, rtol=1e-4):
        raise VolumeError(f"{name}: PixelSpacing differs from the rest of the series")
    ipp = dicom_headers.floats(view, "ImagePositionPatient", 3, name)
    try:
        size = (int(ds.Rows), int(ds.Columns))
    except (AttributeError, TypeError, ValueError):
        raise VolumeError(f"{name}: no Rows/Columns") from None
    slope, intercept = dicom_headers.rescale(view, name)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax in HTJ2K_SYNTAXES and int(ds.get("PixelRepresentation", 0) or 0) == 1:
        raise VolumeError(
            f"{name}: signed pixel data in HTJ2K ({syntax}) does not decode correctly with the "
            "installed decoder (pylibjpeg-openjpeg); have the sender use JPEG 2000, JPEG-LS or "
            "JPEG lossless, or uncompressed"
        )
    image = SliceRecord(
        position=float(np.dot(geometry.normal, ipp)),
        origin=(float(ipp[0]), float(ipp[1]), float(ipp[2])),
        name=name,
        path=path,
        frame=frame,
        # A frame of an enhanced instance is no instance of its own: no number to name it by.
        instance_number=dicom_headers.instance_number(ds) if frame is None else None,
        slope=slope,
        intercept=intercept,
        deflated=syntax == DeflatedExplicitVRLittleEndian,
    )
    return image, size


def _slices(paths: Sequence[Path]) -> tuple[list[SliceRecord], tuple[int, int], _SeriesGeometry]:
    """The series' slice records, sorted along the normal; its image size and geometry.

    Only these small records leave: the headers (datasets) are dropped on return.
    """
    headers, series_uid = _headers(paths)
    views = [
        (view, path, ds, view_name, frame)
        for ds, path, name in headers
        for view, view_name, frame in dicom_headers.images(ds, path, name)
    ]
    first, _, first_ds, first_name, _ = views[0]
    geometry = _geometry(first, first_ds, first_name, series_uid)
    images: list[SliceRecord] = []
    shape: tuple[int, int] | None = None
    for view, path, ds, name, frame in views:
        image, size = _image(view, path, ds, name, frame, geometry)
        if shape is None:
            shape = size
        elif size != shape:
            raise VolumeError(
                f"{name}: image size {size[0]}x{size[1]} differs from {shape[0]}x{shape[1]} (mixed sizes)"
            )
        images.append(image)
    assert shape is not None  # views is never empty: _headers refuses no instances
    images.sort(key=lambda s: s.position)
    return images, shape, geometry


def _slice_spacing(positions: np.ndarray, nominal_dz: float) -> float:
    """The series' slice spacing, or why its positions do not make one volume."""
    gaps = np.diff(positions)
    if not len(gaps):
        # One slice: no positions to measure; the nominal thickness is the best available.
        return nominal_dz
    if np.any(gaps < POSITION_TOLERANCE_MM):
        k = int(np.argmin(gaps))
        raise VolumeError(
            f"two instances share one slice position ({positions[k]:.3f} mm along the normal): "
            "duplicate instances or mixed acquisitions"
        )
    dz = float(np.median(gaps))
    if gaps.max() > MAX_GAP_RATIO * dz:
        raise VolumeError(
            f"slice gap of {gaps.max():.2f} mm where spacing is {dz:.2f} mm: slices are missing"
        )
    return dz


def load_series(paths: Sequence[Path], pool: Pooling | None = None) -> Volume:
    """Load one CT series as a (z, y, x) float32 HU volume sorted along the slice normal.

    `pool`: the working grid a model needs (processors.preprocessing), as a function of the
    series' (z, y, x) shape and spacing giving integer pooling factors; the volume is then
    the series area-averaged by them (spacing, affine and slice tables to match, the
    series' own slice tables kept: `Volume.series_positions_mm`). None: full resolution.

    Raises `VolumeError` when the files do not form one volume: unreadable files,
    instances without pixel data, more than one series, missing or inconsistent
    geometry (orientation, position, pixel spacing, image size), duplicate positions
    or missing slices.
    """
    images, shape, geometry = _slices(paths)
    positions = np.array([s.position for s in images])
    dz = _slice_spacing(positions, geometry.nominal_dz)
    spacing_zyx = (dz, float(geometry.pixel_spacing[0]), float(geometry.pixel_spacing[1]))
    kz, ky, kx = pool_factors(pool, (len(images), shape[0], shape[1]), spacing_zyx)
    hu = read_pixels(images, shape, (kz, ky, kx))

    series_positions = tuple(float(p) for p in positions)
    series_numbers = tuple(s.instance_number for s in images)
    affine = series_affine(images[0].origin, geometry.iop, spacing_zyx)
    volume = Volume(
        hu=hu,
        spacing_zyx=spacing_zyx,
        study_uid=geometry.study_uid,
        series_uid=geometry.series_uid,
        n_instances=len(paths),
        positions_mm=series_positions,
        instance_numbers=series_numbers,
        affine=affine,
    )
    if (kz, ky, kx) == (1, 1, 1):
        return volume
    # Pooled voxel p covers series voxels p k .. p k + k - 1: its centre is at p k + (k - 1) / 2.
    to_series = np.eye(4)
    to_series[:3, :3] = np.diag([kz, ky, kx])
    to_series[:3, 3] = (np.array([kz, ky, kx]) - 1) / 2
    n_out = hu.shape[0]
    pooled_positions = tuple(float(np.mean(positions[g * kz : (g + 1) * kz])) for g in range(n_out))
    return replace(
        volume,
        spacing_zyx=(dz * kz, spacing_zyx[1] * ky, spacing_zyx[2] * kx),
        positions_mm=pooled_positions,
        instance_numbers=(None,) * n_out if kz > 1 else series_numbers,
        affine=affine @ to_series,
        pool_zyx=(kz, ky, kx),
        source_positions_mm=series_positions if kz > 1 else (),
        source_instance_numbers=series_numbers if kz > 1 else (),
    )
