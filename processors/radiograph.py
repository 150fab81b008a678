"""A projection radiograph (CR/DX) → one image in presentation values, in the standard orientation.

The radiograph counterpart of `processors.dicom_volume.load_series`, returning the same
`Volume` type (one slice, `hu` holding presentation values, not Hounsfield units) so the
inference path needs nothing new. What it normalises, because senders differ:

* MONOCHROME1 (white = low values, common on CR readers) is inverted, so brighter means
  more attenuation whatever the sender;
* the Modality LUT (RescaleSlope/Intercept) is applied where present;
* PatientOrientation puts the patient's left on the right of the array and the head at
  the top: a row direction of "R" (mirrored) flips the columns, a column direction of
  "H" (upside down) flips the rows;
* spacing: PixelSpacing if present, else ImagerPixelSpacing.

A series holding several images (a PA and a lateral, say) gives its frontal one: the
PA/AP view if any, else the first instance. Refusals are `VolumeError`s naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from processors.dicom_volume import DEFER_BYTES, Volume, VolumeError

FRONTAL_VIEWS = ("PA", "AP")


def _read(path: Path) -> Dataset:
    try:
        # Pixel data deferred: only the frontal image of the series is ever decoded (issue 16).
        return dcmread(path, defer_size=DEFER_BYTES)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise VolumeError(f"{path.name}: not a readable DICOM file ({exc})") from exc


def single_frame(ds: Dataset, name: str) -> np.ndarray:
    """The one greyscale frame of a projection image (radiograph or mammogram view), decoded;
    a `VolumeError` naming the file when there is none or it cannot be decoded."""
    if "PixelData" not in ds:
        raise VolumeError(f"{name}: no pixel data; not an image instance")
    try:
        pixels: np.ndarray = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for truncated or undecodable pixel data
        raise VolumeError(f"{name}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim != 2:
        raise VolumeError(f"{name}: expected one single-sample frame, got pixel data of shape {pixels.shape}")
    return pixels


def _spacing(ds: Dataset, name: str) -> tuple[float, float]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value:
            try:
                row, col = (float(v) for v in value)
            except (TypeError, ValueError):
                raise VolumeError(f"{name}: {keyword} is not two numbers ({value!r})") from None
            if row > 0 and col > 0 and np.isfinite([row, col]).all():
                return row, col
            raise VolumeError(f"{name}: {keyword} must be positive, got {list(value)}")
    raise VolumeError(f"{name}: neither PixelSpacing nor ImagerPixelSpacing (missing geometry)")


def load_radiograph(paths: Sequence[Path]) -> Volume:
    """The frontal image of a CR/DX series as a (1, rows, cols) float32 `Volume`."""
    if not paths:
        raise VolumeError("no instances")
    datasets = [(_read(Path(p)), Path(p).name) for p in paths]
    series = {str(ds.get("SeriesInstanceUID", "")) for ds, _ in datasets}
    if len(series) != 1:
        raise VolumeError(f"instances belong to {len(series)} series; a radiograph is one series")
    frontal = [d for d in datasets if str(d[0].get("ViewPosition", "")).upper() in FRONTAL_VIEWS]
    ds, name = (frontal or datasets)[0]
    pixels = single_frame(ds, name)
    row_mm, col_mm = _spacing(ds, name)
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{name}: RescaleSlope/RescaleIntercept are not numeric") from exc
    image = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "MONOCHROME1":
        bits = int(ds.get("BitsStored", 16) or 16)
        top = float(2**bits - 1) * slope + intercept
        image = np.float32(top) - image
    elif photometric != "MONOCHROME2":
        raise VolumeError(f"{name}: PhotometricInterpretation {photometric} is not a greyscale radiograph")
    orientation = [str(v).upper() for v in (ds.get("PatientOrientation") or [])]
    if len(orientation) == 2:
        if orientation[0].startswith("R"):
            image = image[:, ::-1]
        if orientation[1].startswith("H"):
            image = image[::-1, :]
    return Volume(
        hu=np.ascontiguousarray(image[np.newaxis]),
        spacing_zyx=(1.0, row_mm, col_mm),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=next(iter(series)),
        n_instances=len(datasets),
    )
