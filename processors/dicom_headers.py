"""One DICOM instance's header, read without its pixel data: what a series' geometry is
checked and sorted from before a single pixel is decoded (processors/dicom_volume.py).

Every helper names the file (and frame) and the attribute in its `VolumeError`, in words
an integration engineer can act on. Enhanced (multi-frame) objects give one view per frame,
its geometry from the functional groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError


class VolumeError(ValueError):
    """The instances do not form one loadable volume."""


# Header pass: elements larger than this are not read, only their place in the file noted
# (pydicom's deferred read). Pixel data of one CT slice is 512 KB; headers are a few KB.
DEFER_BYTES = 16 * 1024
PixelTags = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# HTJ2K (lossless, lossless RPCL, lossy). Signed HTJ2K from OpenJPH decodes to values clipped
# to [0, 2^(bits-1)) with pylibjpeg-openjpeg 2.2.1 and 2.6 (OpenJPEG; the codestream itself round-trips
# in OpenJPH, and JPEG 2000 of the same pixels decodes right): wrong HU, silently. Such a
# series is refused (tests/unit/test_compressed_loading.py holds this to the decoder).
HTJ2K_SYNTAXES = ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")


def instance_number(ds: Dataset) -> int | None:
    """InstanceNumber (type 2: may be empty or, from a careless sender, not a number)."""
    try:
        value = ds.get("InstanceNumber")
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def read_header(path: Path) -> tuple[Dataset, bool]:
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


def floats(ds: Dataset, keyword: str, count: int, name: str) -> np.ndarray:
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


def rescale(ds: Dataset, name: str) -> tuple[float, float]:
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


def images(ds: Dataset, path: Path, name: str) -> list[tuple[Dataset, str, int | None]]:
    """The images of one instance, each with the dataset its geometry is read from."""
    frames = _n_frames(ds, name)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if not enhanced:
        # A classic image with several frames has one position for all of them: no volume.
        return [(ds, name, None if frames == 1 else -frames)]
    return [(_frame_view(ds, i, f"{name} frame {i + 1}"), f"{name} frame {i + 1}", i) for i in range(frames)]
