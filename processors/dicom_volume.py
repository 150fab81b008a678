"""DICOM series → volume in Hounsfield units, ordered by position, not by file or instance number.

Pure: paths in, a `Volume` out, or a `VolumeError` that says what is wrong with the
series in words an integration engineer can act on. Slices are sorted by the
projection of ImagePositionPatient on the slice normal (the cross product of the
ImageOrientationPatient row and column directions): InstanceNumber and file order are
whatever the sender chose and must not be trusted for geometry.

Memory is bounded by the output, not the series (issue 16: a 240 x 512 x 512 head CT
took 17.9 GB reading every file whole, converting each slice to float and stacking):

1. headers only (pixel data deferred, never read) to validate the geometry and sort the
   slices — a broken series is refused before a single pixel is decoded;
2. pixel data one slice (or frame) at a time, in sorted order, straight into one
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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian

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
    # A volume loaded onto a coarser working grid (`load_series(..., pool=...)`): its (z, y, x)
    # pooling factors, and the series' own per-slice tables, ascending along the normal, which
    # its slices index: slice i of `hu` averages series slices series_slices(i, i + 1). Then
    # `positions_mm` are the pooled slices' (mean) positions and `instance_numbers` None (a
    # pooled slice is no instance); what a finding names comes from the series' tables.
    # Empty tables: `positions_mm` and `instance_numbers` are the series' own.
    pool_zyx: tuple[int, int, int] = (1, 1, 1)
    source_positions_mm: tuple[float, ...] = ()
    source_instance_numbers: tuple[int | None, ...] = ()

    @property
    def series_positions_mm(self) -> tuple[float, ...]:
        """Position along the normal of every slice of the series (not of `hu`), ascending."""
        return self.source_positions_mm or self.positions_mm

    @property
    def series_instance_numbers(self) -> tuple[int | None, ...]:
        """InstanceNumber of every slice of the series, in `series_positions_mm` order."""
        return self.source_instance_numbers if self.source_positions_mm else self.instance_numbers

    def series_slices(self, start: int, stop: int) -> tuple[int, int]:
        """Slices [start, stop) of `hu` → the series slices [first, end) they were averaged from."""
        kz = self.pool_zyx[0]
        n = len(self.series_positions_mm) or self.hu.shape[0]
        return min(start * kz, n), min(stop * kz, n)

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


# Header pass: elements larger than this are not read, only their place in the file noted
# (pydicom's deferred read). Pixel data of one CT slice is 512 KB; headers are a few KB.
DEFER_BYTES = 16 * 1024
PixelTags = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# HTJ2K (lossless, lossless RPCL, lossy). Signed HTJ2K from OpenJPH decodes to values clipped
# to [0, 2^(bits-1)) with pylibjpeg-openjpeg 2.2.1 and 2.6 (OpenJPEG; the codestream itself round-trips
# in OpenJPH, and JPEG 2000 of the same pixels decodes right): wrong HU, silently. Such a
# series is refused (tests/unit/test_compressed_loading.py holds this to the decoder).
HTJ2K_SYNTAXES = ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")
# (series shape, spacing) -> integer (z, y, x) pooling factors: how coarse a working grid a
# model's preprocessing can take (processors.preprocessing declares one per model).
Pooling = Callable[[tuple[int, int, int], tuple[float, float, float]], tuple[int, int, int]]


@dataclass(frozen=True)
class _Image:
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


def _instance_number(ds: Dataset) -> int | None:
    """InstanceNumber (type 2: may be empty or, from a careless sender, not a number)."""
    try:
        value = ds.get("InstanceNumber")
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _read_header(path: Path) -> tuple[Dataset, bool]:
    """The dataset without its pixel data, and whether it had any."""
    try:
        ds = dcmread(path, defer_size=DEFER_BYTES)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise VolumeError(f"{Path(path).name}: not a readable DICOM file ({exc})") from exc
    has_pixels = False
    for keyword in PixelTags:
        if keyword in ds:
            has_pixels = True
            # Encapsulated (compressed) pixel data has no length to defer by and was read:
            # drop it so the headers of a whole series stay small.
            del ds[keyword]
    return ds, has_pixels


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


def _n_frames(ds: Dataset, name: str) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise VolumeError(f"{name}: NumberOfFrames is not a number ({ds.get('NumberOfFrames')!r})") from None


def _group(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """A functional group macro of one frame of an enhanced object: per-frame if present there,
    else shared (PS3.3 C.7.6.16: a macro is in one or the other)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        inner = items[index].get(sequence) if items is not None and len(items) > index else None
        if inner:
            return inner[0]
    return None


def _frame_view(ds: Dataset, frame: int, name: str) -> Dataset:
    """The attributes a single-frame instance has at top level, for one frame of an enhanced
    (multi-frame) instance: position, orientation, spacing and rescale from its functional
    groups, falling back to the top level where a sender put them there."""
    view = Dataset()
    for keyword, sequence, attribute in (
        ("ImagePositionPatient", "PlanePositionSequence", "ImagePositionPatient"),
        ("ImageOrientationPatient", "PlaneOrientationSequence", "ImageOrientationPatient"),
        ("PixelSpacing", "PixelMeasuresSequence", "PixelSpacing"),
        ("SliceThickness", "PixelMeasuresSequence", "SliceThickness"),
        ("RescaleSlope", "PixelValueTransformationSequence", "RescaleSlope"),
        ("RescaleIntercept", "PixelValueTransformationSequence", "RescaleIntercept"),
    ):
        item = _group(ds, frame, sequence)
        value = item.get(attribute) if item is not None else None
        if value is None:
            value = ds.get(keyword)
        if value is not None:
            setattr(view, keyword, value)
    return view


def _images(ds: Dataset, path: Path, name: str) -> list[tuple[Dataset, str, int | None]]:
    """The images of one instance, each with the dataset its geometry is read from."""
    frames = _n_frames(ds, name)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if not enhanced:
        # A classic image with several frames has one position for all of them: no volume.
        return [(ds, name, None if frames == 1 else -frames)]
    return [(_frame_view(ds, i, f"{name} frame {i + 1}"), f"{name} frame {i + 1}", i) for i in range(frames)]


def _pool_factors(
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


def _decode(image: _Image, shape: tuple[int, int]) -> np.ndarray:
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


def _pooled_hu(pixels: np.ndarray, ky: int, kx: int, slope: float, intercept: float) -> np.ndarray:
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
    headers = [(*_read_header(Path(p)), Path(p)) for p in paths]
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
    iop = _floats(first, "ImageOrientationPatient", 6, name)
    row_dir, col_dir = iop[:3], iop[3:]
    if not (
        np.isclose(np.linalg.norm(row_dir), 1.0, atol=1e-3)
        and np.isclose(np.linalg.norm(col_dir), 1.0, atol=1e-3)
        and abs(float(np.dot(row_dir, col_dir))) < 1e-3
    ):
        raise VolumeError(f"{name}: ImageOrientationPatient rows/columns are not orthonormal")
    pixel_spacing = _floats(first, "PixelSpacing", 2, name)
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
) -> tuple[_Image, tuple[int, int]]:
    """One slice's record (where it lies, how to decode and rescale it) and its size."""
    if frame is not None and frame < 0:
        raise VolumeError(
            f"{name}: {-frame} frames without per-frame positions (not an enhanced image); "
            "a volume needs one position per slice"
        )
    orientation = _floats(view, "ImageOrientationPatient", 6, name)
    if not np.allclose(orientation, geometry.iop, atol=ORIENTATION_TOLERANCE):
        raise VolumeError(f"{name}: orientation differs from the rest of the series")
    if not np.allclose(_floats(view, "PixelSpacing", 2, name), geometry.pixel_spacing, rtol=1e-4):
        raise VolumeError(f"{name}: PixelSpacing differs from the rest of the series")
    ipp = _floats(view, "ImagePositionPatient", 3, name)
    try:
        size = (int(ds.Rows), int(ds.Columns))
    except (AttributeError, TypeError, ValueError):
        raise VolumeError(f"{name}: no Rows/Columns") from None
    slope, intercept = _rescale(view, name)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax in HTJ2K_SYNTAXES and int(ds.get("PixelRepresentation", 0) or 0) == 1:
        raise VolumeError(
            f"{name}: signed pixel data in HTJ2K ({syntax}) does not decode correctly with the "
            "installed decoder (pylibjpeg-openjpeg); have the sender use JPEG 2000, JPEG-LS or "
            "JPEG lossless, or uncompressed"
        )
    image = _Image(
        position=float(np.dot(geometry.normal, ipp)),
        origin=(float(ipp[0]), float(ipp[1]), float(ipp[2])),
        name=name,
        path=path,
        frame=frame,
        # A frame of an enhanced instance is no instance of its own: no number to name it by.
        instance_number=_instance_number(ds) if frame is None else None,
        slope=slope,
        intercept=intercept,
        deflated=syntax == DeflatedExplicitVRLittleEndian,
    )
    return image, size


def _slices(paths: Sequence[Path]) -> tuple[list[_Image], tuple[int, int], _SeriesGeometry]:
    """The series' slice records, sorted along the normal; its image size and geometry.

    Only these small records leave: the headers (datasets) are dropped on return.
    """
    headers, series_uid = _headers(paths)
    views = [
        (view, path, ds, view_name, frame)
        for ds, path, name in headers
        for view, view_name, frame in _images(ds, path, name)
    ]
    first, _, first_ds, first_name, _ = views[0]
    geometry = _geometry(first, first_ds, first_name, series_uid)
    images: list[_Image] = []
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


def _read_pixels(images: list[_Image], shape: tuple[int, int], k_zyx: tuple[int, int, int]) -> np.ndarray:
    """Decode slice by slice, in order, into one preallocated (pooled) float32 HU array."""
    kz, ky, kx = k_zyx
    n = len(images)
    # z groups: consecutive slices [g kz, (g + 1) kz); the last takes what is left.
    n_out = -(-n // kz)
    hu = np.empty((n_out, shape[0] // ky, shape[1] // kx), dtype=np.float32)
    for i, image in enumerate(images):
        values = _pooled_hu(_decode(image, shape), ky, kx, image.slope, image.intercept)
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
    kz, ky, kx = _pool_factors(pool, (len(images), shape[0], shape[1]), spacing_zyx)
    hu = _read_pixels(images, shape, (kz, ky, kx))

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
