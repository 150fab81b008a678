"""A head CT study shaped the way a modern scanner sends one (issue 16: real-shaped data).

The demo and most tests send one clean axial series per study. A scanner sends more: a
scout (two localizer projections), the 5 mm soft-tissue axials a radiologist reads, a
thin (0.625 mm) soft-tissue reconstruction of the same spiral, a bone-kernel
reconstruction, and an X-Ray Radiation Dose SR without pixels. Every series but the
scout and the SR matches the ICH routing rule by its description, so the pipeline has to
choose; the thin series is the largest, the bone kernel the sharpest, and neither is what
the model was trained on. This module writes such a study from one ICH head phantom
(models/phantoms.py), so a bleed study shows the same bleed on every reconstruction.

    manifest = write_realistic_head_study(Path("study"), bleed=True, rng=np.random.default_rng(1))
    storescu -aec RADTRIAGE 127.0.0.1 11112 $(manifest.files())

How the anatomy gets onto each series' grid: the phantom is drawn once at a native grid
(64 slices of 2.5 mm, 256 x 256 pixels over a 240 mm field of view), then every output
slice is a linear interpolation along z (a thick slice averages the native profile over
its thickness, as a reconstruction of that thickness does) zoomed in-plane to the output
matrix with scipy.ndimage.zoom, order 1. A series shorter than the head (the tests' few
thin slices) is centred on the bleed, else on the head. Slices are made and written one
at a time, so memory stays at a few slices whatever the series length.

models/dicom_writer.write_ct_series is not used for the images: it writes one series per
study with SeriesNumber 1, no kernel, a fixed ImageType, a signedness chosen from the data
and z centred on 0 — the very header facts this study must vary.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from scipy import ndimage

from models.phantoms import AIR_HU, HU_MAX, HU_MIN, Phantom, head_ct_phantom

SeriesKind = Literal["scout", "axial", "thin", "bone", "dose_sr"]
ALL_KINDS: tuple[SeriesKind, ...] = ("scout", "axial", "thin", "bone", "dose_sr")
Vendor = Literal["siemens", "ge"]
InstanceOrder = Literal["ascending", "descending"]
TransferSyntax = Literal["explicit", "jpeg-ls", "jpeg-lossless", "rle"]

XRAY_RADIATION_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
# dcmtk's encoder for each compressed syntax and its options (every one lossless).
_ENCODERS: dict[TransferSyntax, tuple[str, tuple[str, ...]]] = {
    "jpeg-ls": ("dcmcjpls", ()),  # JPEG-LS Lossless, 1.2.840.10008.1.2.4.80
    "jpeg-lossless": ("dcmcjpeg", ("--encode-lossless-sv1",)),  # JPEG Lossless SV1, .4.70
    "rle": ("dcmcrle", ()),  # RLE Lossless, .5
}

# The native grid the phantom is drawn on. head_ct_phantom clips its slice spacing to
# >= 2.5 mm, so 64 slices come out 2.5 mm apart (160 mm: skull base to vertex and some air).
NATIVE_SLICES = 64
NATIVE_MATRIX = 256
RECON_FOV_MM = 240.0  # ReconstructionDiameter: a typical adult head display field of view
SCOUT_PIXEL_MM = 0.5
STUDY_DESCRIPTION = "CT HEAD WO CONTRAST"


@dataclass(frozen=True)
class _Recon:
    """What a vendor calls one reconstruction, and how it looks."""

    description: str
    kernel: str
    thickness_mm: float
    number: int
    # Added noise (HU, std) on top of the interpolated phantom: thinner slices are noisier.
    noise_hu: float
    # Edge enhancement of a sharp (bone) kernel: amount of unsharp masking; 0 = soft tissue.
    sharpen: float = 0.0
    window: tuple[str, str] = ("40", "80")


_RECONS: dict[Vendor, dict[str, _Recon]] = {
    "siemens": {
        "scout": _Recon("Topogram 0.6 T20f", "T20f", 0.6, 1, 0.0),
        "axial": _Recon("Head 5.0 H30s", "H30s", 5.0, 2, 2.0),
        "thin": _Recon("Head 0.625 H30s", "H30s", 0.625, 3, 6.0),
        "bone": _Recon("Head 1.25 Bone", "H70h", 1.25, 4, 15.0, sharpen=1.2, window=("600", "2800")),
        "dose_sr": _Recon("Dose Report", "", 0.0, 501, 0.0),
    },
    "ge": {
        "scout": _Recon("Scout", "STANDARD", 0.6, 1, 0.0),
        "axial": _Recon("HEAD AXIAL 5mm", "STANDARD", 5.0, 2, 2.0),
        "thin": _Recon("HEAD 0.625mm", "STANDARD", 0.625, 3, 6.0),
        "bone": _Recon("HEAD BONE", "BONE", 1.25, 4, 15.0, sharpen=1.2, window=("600", "2800")),
        "dose_sr": _Recon("Dose Report", "", 0.0, 999, 0.0),
    },
}


@dataclass(frozen=True)
class SeriesInfo:
    kind: SeriesKind
    series_uid: str
    series_number: int
    description: str
    modality: str
    # Part 10 files in InstanceNumber order.
    files: tuple[Path, ...]
    image_type: tuple[str, ...] = ()
    convolution_kernel: str = ""
    slice_thickness_mm: float | None = None
    # For axial series: the z (mm, LPS) of the lowest and highest slice.
    z_range_mm: tuple[float, float] | None = None


@dataclass(frozen=True)
class StudyManifest:
    study_uid: str
    accession: str
    patient_id: str
    root: Path
    has_bleed: bool
    bleed_volume_ml: float
    # Patient z (mm) of the lowest and highest native slice holding blood; None if no bleed.
    bleed_z_mm: tuple[float, float] | None
    signed: bool
    instance_order: InstanceOrder
    transfer_syntax: TransferSyntax
    series: tuple[SeriesInfo, ...] = field(default_factory=tuple)

    def of(self, kind: SeriesKind) -> SeriesInfo:
        for s in self.series:
            if s.kind == kind:
                return s
        raise KeyError(f"the study has no {kind} series (it has {[s.kind for s in self.series]})")

    def files(self, kinds: Sequence[SeriesKind] | None = None) -> list[Path]:
        """The files of `kinds` (default: every series), series in the order given."""
        wanted = [s.kind for s in self.series] if kinds is None else list(kinds)
        return [f for kind in wanted for f in self.of(kind).files]


def write_realistic_head_study(
    out_dir: Path,
    *,
    bleed: bool,
    rng: np.random.Generator | None = None,
    include: Sequence[SeriesKind] = ALL_KINDS,
    axial_slices: int = 32,
    thin_slices: int = 240,
    bone_slices: int = 120,
    matrix: int = 512,
    signed: bool = True,
    pad_fov: bool = True,
    padding_value: int | None = None,
    instance_order: InstanceOrder = "ascending",
    vendor: Vendor = "siemens",
    transfer_syntax: TransferSyntax = "explicit",
    accession: str = "",
    patient_id: str = "",
    patient_name: str = "Test^Realistic",
    study_uid: str | None = None,
    min_bleed_ml: float = 5.0,
) -> StudyManifest:
    """Write one head CT study, one directory per series under `out_dir`.

    `signed`: pixels stored as signed int16 HU (RescaleIntercept 0, BitsStored 16), else
    unsigned with RescaleIntercept -1024 and BitsStored 12 (the two conventions scanners
    use). `pad_fov`: pixels outside the reconstruction circle carry PixelPaddingValue,
    `padding_value` (stored units; default -2000 for signed pixels, 0 — that is -1024 HU —
    for unsigned ones, which cannot hold -2000). `instance_order`: InstanceNumber rising
    or falling along +z (towards the head). `transfer_syntax`: anything but "explicit"
    recompresses every image with dcmtk (dcmcjpls, dcmcjpeg, dcmcrle; losslessly).
    """
    unknown = [k for k in include if k not in ALL_KINDS]
    if unknown or not include:
        raise ValueError(f"include must name some of {ALL_KINDS}, got {list(include)}")
    for name, n in (
        ("axial_slices", axial_slices),
        ("thin_slices", thin_slices),
        ("bone_slices", bone_slices),
    ):
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
    if matrix < 64:
        raise ValueError(f"matrix must be >= 64, got {matrix}")
    intercept = 0 if signed else -1024
    dtype = np.dtype(np.int16 if signed else np.uint16)
    pad: int | None = None
    if pad_fov:
        pad = (-2000 if signed else 0) if padding_value is None else int(padding_value)
        lo, hi = (np.iinfo(np.int16).min, np.iinfo(np.int16).max) if signed else (0, 4095)
        if not lo <= pad <= hi:
            raise ValueError(
                f"padding value {pad} cannot be stored in {'signed' if signed else 'unsigned 12-bit'} pixels"
            )
    rng = rng or np.random.default_rng()

    pixel_native = RECON_FOV_MM / NATIVE_MATRIX
    ph = head_ct_phantom(
        rng,
        bleed=bleed,
        shape=(NATIVE_SLICES, NATIVE_MATRIX, NATIVE_MATRIX),
        pixel_mm=pixel_native,
        min_bleed_ml=min_bleed_ml if bleed else 0.0,
    )
    # The couch: a head is scanned somewhere along the table, not at z = 0.
    table_z = float(np.round(rng.uniform(-180.0, -120.0), 1))
    ctx = _StudyContext(
        study_uid=study_uid or generate_uid(),
        frame_uid=generate_uid(),
        accession=accession,
        patient_id=patient_id,
        patient_name=patient_name,
        started=datetime.now(UTC).replace(microsecond=0),
        vendor=vendor,
        signed=signed,
        intercept=intercept,
        dtype=dtype,
        padding=pad,
        instance_order=instance_order,
        transfer_syntax=transfer_syntax,
        device_uid=generate_uid(),
    )
    bleed_z = None
    if ph.bleed_slices is not None:
        bleed_z = tuple(table_z + _native_z(ph, k) for k in ph.bleed_slices)
    # Write the pixel series first: the SR reports their irradiation events.
    counts = {"axial": axial_slices, "thin": thin_slices, "bone": bone_slices}
    written: dict[SeriesKind, SeriesInfo] = {}
    for kind in ALL_KINDS:
        if kind not in include or kind == "dose_sr":
            continue
        recon = _RECONS[vendor][kind]
        series_dir = out_dir / f"{recon.number:03d}_{kind}"
        if kind == "scout":
            written[kind] = _write_scout(ph, table_z, ctx, recon, series_dir)
        else:
            written[kind] = _write_axial(ph, table_z, ctx, kind, recon, counts[kind], matrix, series_dir, rng)
        _compress(written[kind].files, transfer_syntax)
    if "dose_sr" in include:
        written["dose_sr"] = _write_dose_sr(ctx, _RECONS[vendor]["dose_sr"], out_dir, ph, written)
    return StudyManifest(
        study_uid=ctx.study_uid,
        accession=accession,
        patient_id=patient_id,
        root=out_dir,
        has_bleed=ph.has_bleed,
        bleed_volume_ml=ph.bleed_volume_ml,
        bleed_z_mm=(float(bleed_z[0]), float(bleed_z[1])) if bleed_z else None,
        signed=signed,
        instance_order=instance_order,
        transfer_syntax=transfer_syntax,
        # The order a scanner makes them in: scout, reconstructions, then the dose report.
        series=tuple(written[k] for k in ALL_KINDS if k in written),
    )


@dataclass(frozen=True)
class _StudyContext:
    study_uid: str
    frame_uid: str
    accession: str
    patient_id: str
    patient_name: str
    started: datetime
    vendor: Vendor
    signed: bool
    intercept: int
    dtype: np.dtype
    padding: int | None
    instance_order: InstanceOrder
    transfer_syntax: TransferSyntax
    device_uid: str
    # One irradiation event per acquisition: the scout's and the spiral's (every axial
    # reconstruction comes from the same spiral, so they share its event UID).
    scout_event_uid: str = field(default_factory=generate_uid)
    spiral_event_uid: str = field(default_factory=generate_uid)


def _native_z(ph: Phantom, k: float) -> float:
    """Phantom-frame z (mm) of native slice index `k` (the phantom is centred on z = 0)."""
    return (k - (ph.hu.shape[0] - 1) / 2.0) * ph.spacing_zyx[0]


def _sample_native(ph: Phantom, z: float) -> np.ndarray:
    """The phantom at phantom-frame height `z`, linearly interpolated between native slices
    (air beyond its ends), as float32 HU on the native in-plane grid."""
    n, dz = ph.hu.shape[0], ph.spacing_zyx[0]
    f = z / dz + (n - 1) / 2.0
    if f < -0.5 or f > n - 0.5:
        return np.full(ph.hu.shape[1:], AIR_HU, dtype=np.float32)
    f = min(max(f, 0.0), n - 1.0)
    lo = int(np.floor(f))
    w = f - lo
    below = ph.hu[lo].astype(np.float32)
    if w == 0.0 or lo + 1 >= n:
        return below
    return (1.0 - w) * below + w * ph.hu[lo + 1].astype(np.float32)


def _slab(ph: Phantom, z: float, thickness: float) -> np.ndarray:
    """A reconstructed slice of `thickness` centred at `z`: the mean of the native profile
    sampled across the slab (a 5 mm slice averages what a 0.625 mm one resolves)."""
    m = max(1, int(np.ceil(2.0 * thickness / ph.spacing_zyx[0])))
    offsets = ((np.arange(m) + 0.5) / m - 0.5) * thickness if m > 1 else np.zeros(1)
    acc = np.zeros(ph.hu.shape[1:], dtype=np.float32)
    for off in offsets:
        acc += _sample_native(ph, z + float(off))
    return acc / len(offsets)


def _series_centre(ph: Phantom, count: int, thickness: float) -> float:
    """Phantom-frame z the series is centred on: the head's centre when the series covers
    it; a shorter series (a test's few thin slices) is centred on the bleed, if any, so
    every reconstruction shows it, and kept inside the phantom's extent."""
    coverage = ph.hu.shape[0] * ph.spacing_zyx[0]
    length = count * thickness
    if length >= coverage:
        return 0.0
    centre = 0.0
    if ph.bleed_slices is not None:
        centre = _native_z(ph, (ph.bleed_slices[0] + ph.bleed_slices[1]) / 2.0)
    half_room = (coverage - length) / 2.0
    return float(np.clip(centre, -half_room, half_room))


def _fov_mask(matrix: int) -> np.ndarray:
    """True outside the reconstruction circle (where a scanner has no data)."""
    c = (matrix - 1) / 2.0
    yy, xx = np.ogrid[:matrix, :matrix]
    return np.asarray((yy - c) ** 2 + (xx - c) ** 2 > (matrix / 2.0) ** 2)


def _to_stored(hu: np.ndarray, ctx: _StudyContext) -> np.ndarray:
    clipped = np.clip(np.round(hu), HU_MIN, HU_MAX)
    return (clipped - ctx.intercept).astype(ctx.dtype)


def _instance_numbers(count: int, order: InstanceOrder) -> list[int]:
    """InstanceNumber of slice k (k rising with z)."""
    return list(range(1, count + 1)) if order == "ascending" else list(range(count, 0, -1))


def _base_dataset(path: Path, sop_class: str, ctx: _StudyContext) -> FileDataset:
    meta = FileMetaDataset()
    sop_uid = generate_uid()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = ctx.study_uid
    ds.PatientName = ctx.patient_name
    ds.PatientID = ctx.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.AccessionNumber = ctx.accession
    ds.ReferringPhysicianName = ""
    ds.StudyID = ctx.accession[-16:] if ctx.accession else "1"
    ds.StudyDate = ctx.started.strftime("%Y%m%d")
    ds.StudyTime = ctx.started.strftime("%H%M%S")
    ds.StudyDescription = STUDY_DESCRIPTION
    ds.Manufacturer = "radtriage"
    ds.ManufacturerModelName = f"synthetic {ctx.vendor}-style scanner"
    ds.DeviceSerialNumber = "RT0001"
    ds.SoftwareVersions = "radtriage realistic_study 1"
    ds.StationName = "CTSIM1"
    ds.InstitutionName = "radtriage synthetic"
    return ds


def _ct_image_dataset(
    path: Path,
    ctx: _StudyContext,
    recon: _Recon,
    series_uid: str,
    series_time: datetime,
    image_type: list[str],
    rows: int,
    cols: int,
    instance_number: int,
) -> FileDataset:
    """A CT Image Storage instance with everything but geometry and pixels."""
    ds = _base_dataset(path, CTImageStorage, ctx)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = recon.number
    ds.SeriesDescription = recon.description
    ds.ProtocolName = "Head Routine" if ctx.vendor == "siemens" else "5.1 ROUTINE HEAD"
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"  # head first supine: +z (LPS) points to the head
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = series_time.strftime("%Y%m%d")
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series_time.strftime("%H%M%S")
    ds.FrameOfReferenceUID = ctx.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageType = image_type
    ds.InstanceNumber = instance_number
    ds.AcquisitionNumber = 1 if "LOCALIZER" in image_type else 2
    ds.IrradiationEventUID = ctx.scout_event_uid if "LOCALIZER" in image_type else ctx.spiral_event_uid
    ds.KVP = "120"
    ds.ConvolutionKernel = recon.kernel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    # Unsigned CT pixels are 12-bit (0..4095 = -1024..3071 HU); signed ones need the sign bit
    # and -2000 padding, so they take all 16.
    ds.BitsStored = 16 if ctx.signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if ctx.signed else 0
    ds.RescaleIntercept = str(ctx.intercept)
    ds.RescaleSlope = "1"
    ds.WindowCenter, ds.WindowWidth = recon.window
    return ds


def _save(ds: FileDataset, pixels: np.ndarray, path: Path) -> None:
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)


def _write_axial(
    ph: Phantom,
    table_z: float,
    ctx: _StudyContext,
    kind: SeriesKind,
    recon: _Recon,
    count: int,
    matrix: int,
    series_dir: Path,
    rng: np.random.Generator,
) -> SeriesInfo:
    series_dir.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    series_time = ctx.started + timedelta(seconds=30 + recon.number)
    t = recon.thickness_mm
    centre = _series_centre(ph, count, t)
    zs = [centre + (k - (count - 1) / 2.0) * t for k in range(count)]  # phantom frame, rising
    pixel = RECON_FOV_MM / matrix
    # Pixel centres of the output grid, LPS: x to the patient's left, y posterior.
    origin_xy = -(matrix - 1) * pixel / 2.0
    zoom = matrix / NATIVE_MATRIX
    outside = _fov_mask(matrix) if ctx.padding is not None else None
    numbers = _instance_numbers(count, ctx.instance_order)
    files: dict[int, Path] = {}
    for k, z in enumerate(zs):
        native = _slab(ph, z, t)
        # grid_mode: pixel areas map to pixel areas, so output pixel centres lie where the
        # geometry below says (a corner-aligned zoom would shift them by a quarter pixel).
        hu = ndimage.zoom(native, zoom, order=1, grid_mode=True, mode="nearest")
        if recon.sharpen:
            hu = hu + recon.sharpen * (hu - ndimage.gaussian_filter(hu, 1.5))
        if recon.noise_hu:
            hu += recon.noise_hu * rng.standard_normal(hu.shape, dtype=np.float32)
        stored = _to_stored(hu, ctx)
        if outside is not None and ctx.padding is not None:
            stored[outside] = ctx.padding
        number = numbers[k]
        path = series_dir / f"IM{number:05d}.dcm"
        ds = _ct_image_dataset(
            path,
            ctx,
            recon,
            series_uid,
            series_time,
            ["ORIGINAL", "PRIMARY", "AXIAL"],
            matrix,
            matrix,
            number,
        )
        z_patient = table_z + z
        ds.ImagePositionPatient = [f"{origin_xy:.4f}", f"{origin_xy:.4f}", f"{z_patient:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = [f"{pixel:.6f}", f"{pixel:.6f}"]
        ds.SliceThickness = f"{t:g}"
        ds.SpacingBetweenSlices = f"{t:g}"
        ds.SliceLocation = f"{z_patient:.4f}"
        ds.ReconstructionDiameter = f"{RECON_FOV_MM:g}"
        ds.DataCollectionDiameter = "500"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.XRayTubeCurrent = 300
        ds.ExposureTime = 1000
        ds.SpiralPitchFactor = 0.55
        ds.CTDIvol = 52.3
        # CTDIvol means nothing without the phantom it refers to (a head phantom for a head).
        ds.CTDIPhantomTypeCodeSequence = DicomSequence([_code("113690", "DCM", "IEC Head Dosimetry Phantom")])
        ds.RescaleType = "HU"
        if ctx.padding is not None:
            ds.PixelPaddingValue = ctx.padding
        _save(ds, stored, path)
        files[number] = path
    return SeriesInfo(
        kind=kind,
        series_uid=series_uid,
        series_number=recon.number,
        description=recon.description,
        modality="CT",
        files=tuple(files[n] for n in sorted(files)),
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        convolution_kernel=recon.kernel,
        slice_thickness_mm=t,
        z_range_mm=(table_z + zs[0], table_z + zs[-1]),
    )


def _write_scout(
    ph: Phantom, table_z: float, ctx: _StudyContext, recon: _Recon, series_dir: Path
) -> SeriesInfo:
    """Two localizer projections of the phantom, AP (frontal) and lateral, 512 x 512.

    The value is the water-equivalent path length through the head (bone counts more),
    scaled to the 12-bit range a topogram is stored in; not HU (RescaleType US).
    """
    series_dir.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    series_time = ctx.started + timedelta(seconds=5)
    size = 512
    dz, dy, dx = ph.spacing_zyx
    mu = np.clip(ph.hu.astype(np.float32) + 1000.0, 0.0, None) / 1000.0  # relative to water
    views = (
        # name, projection (z, lateral axis), row direction cosines, axis pixel size
        ("AP", mu.sum(axis=1) * dy, ("1", "0", "0"), dx),
        ("LAT", mu.sum(axis=2) * dx, ("0", "1", "0"), dy),
    )
    del mu
    files: list[Path] = []
    extent = (size - 1) * SCOUT_PIXEL_MM / 2.0
    for number, (name, proj, row_cos, across_mm) in enumerate(views, start=1):
        # Image rows run down the patient (top = head): flip z, resample to the scout's pixels.
        img = ndimage.zoom(
            proj[::-1],
            (dz / SCOUT_PIXEL_MM, across_mm / SCOUT_PIXEL_MM),
            order=1,
            grid_mode=True,
            mode="nearest",
        )
        canvas = np.zeros((size, size), dtype=np.float32)
        h, w = min(img.shape[0], size), min(img.shape[1], size)
        r0, c0 = (size - h) // 2, (size - w) // 2
        i0, j0 = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
        canvas[r0 : r0 + h, c0 : c0 + w] = img[i0 : i0 + h, j0 : j0 + w]
        # ~10 units per mm of water: a 200 mm head reaches ~2000 of the 0..4095 range.
        value = np.clip(canvas * 10.0, 0, 4095) + HU_MIN
        stored = _to_stored(value, ctx)
        path = series_dir / f"IM{number:05d}.dcm"
        ds = _ct_image_dataset(
            path,
            ctx,
            recon,
            series_uid,
            series_time,
            ["ORIGINAL", "PRIMARY", "LOCALIZER"],
            size,
            size,
            number,
        )
        top_left = [-extent, -extent]  # x for AP, y for the lateral view
        pos = [f"{top_left[0]:.4f}", "0.0000", f"{table_z + extent:.4f}"]
        if name == "LAT":
            pos = ["0.0000", f"{top_left[1]:.4f}", f"{table_z + extent:.4f}"]
        ds.ImagePositionPatient = pos
        ds.ImageOrientationPatient = [*row_cos, "0", "0", "-1"]  # columns run down the patient
        ds.PixelSpacing = [f"{SCOUT_PIXEL_MM:g}", f"{SCOUT_PIXEL_MM:g}"]
        ds.SliceThickness = f"{recon.thickness_mm:g}"  # the detector row width, as topograms say
        ds.XRayTubeCurrent = 35
        # Not HU: "US" (unspecified, PS3.3 C.11.1.1.2). dciodvfy warns that the CT module does
        # not list the term; claiming HU for a projection would be wrong.
        ds.RescaleType = "US"
        ds.WindowCenter, ds.WindowWidth = "1000", "3000"
        ds.ImageComments = f"{name} topogram"
        _save(ds, stored, path)
        files.append(path)
    return SeriesInfo(
        kind="scout",
        series_uid=series_uid,
        series_number=recon.number,
        description=recon.description,
        modality="CT",
        files=tuple(files),
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        convolution_kernel=recon.kernel,
        slice_thickness_mm=recon.thickness_mm,
    )


def _compress(files: Sequence[Path], syntax: TransferSyntax) -> None:
    """Re-encode `files` in place with dcmtk (lossless): what a sender that compresses does."""
    if syntax == "explicit":
        return
    tool, options = _ENCODERS[syntax]
    exe = shutil.which(tool)
    if exe is None:
        raise RuntimeError(f"dcmtk's {tool} is needed for {syntax} (apt-get install dcmtk)")
    for path in files:
        tmp = path.with_suffix(".tmp")
        done = subprocess.run([exe, *options, str(path), str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {path} failed ({done.returncode}): {done.stderr.strip()}")
        tmp.replace(path)


# --- X-Ray Radiation Dose SR (TID 10011, CT Radiation Dose) ---------------------------------


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue = value
    c.CodingSchemeDesignator = scheme
    c.CodeMeaning = meaning
    return c


def _item(relationship: str, value_type: str, concept: Dataset) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = DicomSequence([concept])
    return item


def _code_item(relationship: str, concept: Dataset, value: Dataset) -> Dataset:
    item = _item(relationship, "CODE", concept)
    item.ConceptCodeSequence = DicomSequence([value])
    return item


def _num_item(concept: Dataset, value: float, unit: Dataset) -> Dataset:
    item = _item("CONTAINS", "NUM", concept)
    measured = Dataset()
    measured.NumericValue = f"{value:g}"
    measured.MeasurementUnitsCodeSequence = DicomSequence([unit])
    item.MeasuredValueSequence = DicomSequence([measured])
    return item


def _text_item(relationship: str, concept: Dataset, text: str) -> Dataset:
    item = _item(relationship, "TEXT", concept)
    item.TextValue = text
    return item


def _uid_item(relationship: str, concept: Dataset, uid: str) -> Dataset:
    item = _item(relationship, "UIDREF", concept)
    item.UID = uid
    return item


def _container(relationship: str, concept: Dataset, children: list[Dataset]) -> Dataset:
    item = _item(relationship, "CONTAINER", concept)
    item.ContinuityOfContent = "SEPARATE"
    item.ContentSequence = DicomSequence(children)
    return item


def _datetime_item(concept: Dataset, when: datetime) -> Dataset:
    item = _item("HAS OBS CONTEXT", "DATETIME", concept)
    item.DateTime = when.strftime("%Y%m%d%H%M%S")
    return item


_MGY = _code("mGy", "UCUM", "mGy")
_MGYCM = _code("mGy.cm", "UCUM", "mGy.cm")
_MM = _code("mm", "UCUM", "mm")
_S = _code("s", "UCUM", "s")


def _acquisition(
    protocol: str,
    acquisition_type: Dataset,
    event_uid: str,
    *,
    exposure_s: float,
    length_mm: float,
    single_mm: float,
    total_mm: float,
    pitch: float | None,
    ma: float,
    rotation_s: float | None,
    ctdivol: float,
    dlp: float,
) -> Dataset:
    """One CT Acquisition (TID 10013): what the scanner did for one irradiation event."""
    source = [
        _text_item("CONTAINS", _code("113832", "DCM", "Identification of the X-Ray Source"), "A"),
        _num_item(_code("113733", "DCM", "KVP"), 120, _code("kV", "UCUM", "kV")),
        _num_item(_code("113833", "DCM", "Maximum X-Ray Tube Current"), ma, _code("mA", "UCUM", "mA")),
        _num_item(_code("113734", "DCM", "X-Ray Tube Current"), ma, _code("mA", "UCUM", "mA")),
    ]
    if rotation_s is not None:
        source.append(_num_item(_code("113834", "DCM", "Exposure Time per Rotation"), rotation_s, _S))
    params = [
        _num_item(_code("113824", "DCM", "Exposure Time"), exposure_s, _S),
        _num_item(_code("113825", "DCM", "Scanning Length"), length_mm, _MM),
        _num_item(_code("113826", "DCM", "Nominal Single Collimation Width"), single_mm, _MM),
        _num_item(_code("113827", "DCM", "Nominal Total Collimation Width"), total_mm, _MM),
    ]
    if pitch is not None:
        params.append(
            _num_item(_code("113828", "DCM", "Pitch Factor"), pitch, _code("{ratio}", "UCUM", "ratio"))
        )
    params += [
        _num_item(
            _code("113823", "DCM", "Number of X-Ray Sources"),
            1,
            _code("{X-Ray sources}", "UCUM", "X-Ray sources"),
        ),
        _container("CONTAINS", _code("113831", "DCM", "CT X-Ray Source Parameters"), source),
    ]
    dose = [
        _num_item(_code("113830", "DCM", "Mean CTDIvol"), ctdivol, _MGY),
        _code_item(
            "CONTAINS",
            _code("113835", "DCM", "CTDIw Phantom Type"),
            _code("113690", "DCM", "IEC Head Dosimetry Phantom"),
        ),
        _num_item(_code("113838", "DCM", "DLP"), dlp, _MGYCM),
    ]
    return _container(
        "CONTAINS",
        _code("113819", "DCM", "CT Acquisition"),
        [
            _text_item("CONTAINS", _code("125203", "DCM", "Acquisition Protocol"), protocol),
            _code_item("CONTAINS", _code("123014", "DCM", "Target Region"), _code("69536005", "SCT", "Head")),
            _code_item("CONTAINS", _code("113820", "DCM", "CT Acquisition Type"), acquisition_type),
            _uid_item("CONTAINS", _code("113769", "DCM", "Irradiation Event UID"), event_uid),
            _container("CONTAINS", _code("113822", "DCM", "CT Acquisition Parameters"), params),
            _container("CONTAINS", _code("113829", "DCM", "CT Dose"), dose),
        ],
    )


def _write_dose_sr(
    ctx: _StudyContext, recon: _Recon, out_dir: Path, ph: Phantom, written: dict[SeriesKind, SeriesInfo]
) -> SeriesInfo:
    """An X-Ray Radiation Dose SR (CT Radiation Dose, TID 10011): the scout's and the
    spiral's irradiation events with CTDIvol and DLP, built with pydicom alone."""
    series_dir = out_dir / f"{recon.number:03d}_dose_sr"
    series_dir.mkdir(parents=True, exist_ok=True)
    path = series_dir / "SR00001.dcm"
    ds = _base_dataset(path, XRAY_RADIATION_DOSE_SR, ctx)
    ended = ctx.started + timedelta(seconds=40)
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = recon.number
    ds.SeriesDescription = recon.description
    ds.SeriesDate = ds.ContentDate = ended.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ended.strftime("%H%M%S")
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    ds.InstanceNumber = 1
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = DicomSequence()
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code("113701", "DCM", "X-Ray Radiation Dose Report")])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "10011"
    ds.ContentTemplateSequence = DicomSequence([template])

    # The spiral covers the head (what the phantom spans); CTDIvol of a routine adult head.
    length = float(ph.hu.shape[0] * ph.spacing_zyx[0])
    ctdivol = 52.3
    spiral_dlp = round(ctdivol * (length + 20.0) / 10.0, 1)  # +20 mm overranging
    scout_dlp = 0.9
    procedure = _code_item(
        "HAS CONCEPT MOD",
        _code("121058", "DCM", "Procedure reported"),
        _code("77477000", "SCT", "Computed Tomography X-Ray"),
    )
    procedure.ContentSequence = DicomSequence(
        [
            _code_item(
                "HAS CONCEPT MOD",
                _code("363703001", "SCT", "Has Intent"),
                _code("261004008", "SCT", "Diagnostic Intent"),
            )
        ]
    )
    scope = _code_item(
        "HAS OBS CONTEXT", _code("113705", "DCM", "Scope of Accumulation"), _code("113014", "DCM", "Study")
    )
    scope.ContentSequence = DicomSequence(
        [_uid_item("HAS PROPERTIES", _code("110180", "DCM", "Study Instance UID"), ctx.study_uid)]
    )
    events = []
    if "scout" in written:
        events.append(
            _acquisition(
                "Topogram",
                _code("113805", "DCM", "Constant Angle Acquisition"),
                ctx.scout_event_uid,
                exposure_s=2.9,
                length_mm=256.0,
                single_mm=0.6,
                total_mm=0.6,
                pitch=None,
                ma=35,
                rotation_s=None,
                ctdivol=0.11,
                dlp=scout_dlp,
            )
        )
    events.append(
        _acquisition(
            "Head Routine",
            _code("116152004", "SCT", "Spiral Acquisition"),
            ctx.spiral_event_uid,
            exposure_s=10.4,
            length_mm=length,
            single_mm=0.625,
            total_mm=40.0,
            pitch=0.55,
            ma=300,
            rotation_s=1.0,
            ctdivol=ctdivol,
            dlp=spiral_dlp,
        )
    )
    total_dlp = spiral_dlp + (scout_dlp if "scout" in written else 0.0)
    ds.ContentSequence = DicomSequence(
        [
            procedure,
            _code_item(
                "HAS OBS CONTEXT", _code("121005", "DCM", "Observer Type"), _code("121007", "DCM", "Device")
            ),
            _uid_item("HAS OBS CONTEXT", _code("121012", "DCM", "Device Observer UID"), ctx.device_uid),
            _text_item("HAS OBS CONTEXT", _code("121013", "DCM", "Device Observer Name"), "CTSIM1"),
            _text_item(
                "HAS OBS CONTEXT", _code("121014", "DCM", "Device Observer Manufacturer"), "radtriage"
            ),
            _text_item(
                "HAS OBS CONTEXT",
                _code("121015", "DCM", "Device Observer Model Name"),
                f"synthetic {ctx.vendor}-style scanner",
            ),
            _text_item("HAS OBS CONTEXT", _code("121016", "DCM", "Device Observer Serial Number"), "RT0001"),
            _datetime_item(_code("113809", "DCM", "Start of X-Ray Irradiation"), ctx.started),
            _datetime_item(_code("113810", "DCM", "End of X-Ray Irradiation"), ended),
            scope,
            _container(
                "CONTAINS",
                _code("113811", "DCM", "CT Accumulated Dose Data"),
                [
                    _num_item(
                        _code("113812", "DCM", "Total Number of Irradiation Events"),
                        len(events),
                        _code("{events}", "UCUM", "events"),
                    ),
                    _num_item(_code("113813", "DCM", "CT Dose Length Product Total"), total_dlp, _MGYCM),
                ],
            ),
            *events,
            _code_item(
                "CONTAINS",
                _code("113854", "DCM", "Source of Dose Information"),
                _code("113856", "DCM", "Automated Data Collection"),
            ),
        ]
    )
    ds.save_as(path, enforce_file_format=True)
    return SeriesInfo(
        kind="dose_sr",
        series_uid=str(ds.SeriesInstanceUID),
        series_number=recon.number,
        description=recon.description,
        modality="SR",
        files=(path,),
    )


__all__: list[str] = [
    "ALL_KINDS",
    "XRAY_RADIATION_DOSE_SR",
    "SeriesInfo",
    "SeriesKind",
    "StudyManifest",
    "TransferSyntax",
    "write_realistic_head_study",
]
