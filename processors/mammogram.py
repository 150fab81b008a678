"""A mammography (MG) series -> its standard views in presentation values, one orientation.

The mammography counterpart of `processors.radiograph.load_radiograph`: the inference
path runs it on an MG series before the BI-RADS model, which reads RCC, RMLO, LCC and
LMLO the same way. What it normalises, because senders differ:

* MONOCHROME1 is inverted, so brighter means denser whatever the sender;
* the Modality LUT (RescaleSlope/Intercept) is applied where present;
* the chest wall goes to column 0 for every view of either breast: a PatientOrientation
  row direction starting with "P" (what real systems store for a right breast: the
  nipple points to the left) flips the columns;
* spacing: PixelSpacing if present, else ImagerPixelSpacing.

Only CC and MLO views are taken (ViewPosition); the rest of a diagnostic work-up (XCC,
ML, LM, spot compression, magnification) is skipped, not refused. A repeat exposure of a
view (two images with the same key) gives the one with the highest InstanceNumber.
Refusals are `VolumeError`s naming the file; malformed input never raises anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from processors.dicom_volume import DEFER_BYTES, VolumeError
from processors.radiograph import single_frame

MAMMO_VIEWS: tuple[str, ...] = ("RCC", "RMLO", "LCC", "LMLO")  # the model's channel order
TAKEN_POSITIONS: tuple[str, ...] = ("CC", "MLO")


@dataclass(frozen=True)
class MammoImage:
    pixels: np.ndarray  # (rows, cols) float32, brighter = denser, chest wall at column 0 (normalised)
    pixel_mm: tuple[float, float]
    laterality: str  # "L"/"R"
    view: str  # "CC"/"MLO"
    instance_number: int
    sop_instance_uid: str


@dataclass(frozen=True)
class Mammogram:
    views: dict[str, MammoImage]  # keyed "RCC", "RMLO", "LCC", "LMLO" (those present)
    study_uid: str
    series_uid: str
    n_instances: int


def _read(path: Path) -> Dataset:
    try:
        # Pixel data deferred: read from the file only for the views the model takes (a series
        # also holds spot, magnification and repeat views; issue 16).
        return dcmread(path, defer_size=DEFER_BYTES)
    except Exception as exc:  # pydicom raises many types for a truncated or foreign file
        raise VolumeError(f"{path.name}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def _text(ds: Dataset, keyword: str, *, upper: bool = True) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element only fails when it is parsed
        return ""
    text = "" if value is None else str(value).strip()
    return text.upper() if upper else text


def _instance_number(ds: Dataset) -> int:
    """InstanceNumber (type 2: may be empty or, from a careless sender, not a number): 0 then."""
    try:
        value = ds.get("InstanceNumber")
        return 0 if value is None or value == "" else int(value)
    except Exception:
        return 0


def _spacing(ds: Dataset, name: str) -> tuple[float, float]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
        except Exception:
            raise VolumeError(f"{name}: {keyword} cannot be parsed") from None
        if value:
            try:
                row, col = (float(v) for v in value)
            except (TypeError, ValueError):
                raise VolumeError(f"{name}: {keyword} is not two numbers ({value!r})") from None
            if row > 0 and col > 0 and np.isfinite([row, col]).all():
                return row, col
            raise VolumeError(f"{name}: {keyword} must be positive, got {list(value)}")
    raise VolumeError(f"{name}: neither PixelSpacing nor ImagerPixelSpacing (missing geometry)")


def _laterality(ds: Dataset, name: str) -> str:
    for keyword in ("ImageLaterality", "Laterality"):
        value = _text(ds, keyword)
        if value in ("L", "R"):
            return value
    raise VolumeError(f"{name}: no ImageLaterality or Laterality of L or R; cannot tell which breast")


def _image(ds: Dataset, name: str, laterality: str, view: str) -> MammoImage:
    # No pixel data is the first refusal, before the photometric check; the frame is decoded
    # only once that check has passed (single_frame asks for the pixel data again: cheap).
    if "PixelData" not in ds:
        raise VolumeError(f"{name}: no pixel data; not an image instance")
    photometric = _text(ds, "PhotometricInterpretation") or "MONOCHROME2"
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise VolumeError(f"{name}: PhotometricInterpretation {photometric} is not a greyscale mammogram")
    pixels = single_frame(ds, name)
    row_mm, col_mm = _spacing(ds, name)
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        bits = int(ds.get("BitsStored", 16) or 16)
    except Exception as exc:
        raise VolumeError(f"{name}: RescaleSlope/RescaleIntercept/BitsStored are not numeric") from exc
    if not (np.isfinite(slope) and np.isfinite(intercept)) or not 1 <= bits <= 16:
        raise VolumeError(f"{name}: RescaleSlope/RescaleIntercept/BitsStored out of range")
    image = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if photometric == "MONOCHROME1":
        top = float(2**bits - 1) * slope + intercept
        image = np.float32(top) - image
    try:
        orientation = [str(v).strip().upper() for v in (ds.get("PatientOrientation") or [])]
    except Exception:
        orientation = []
    # Row direction "P": the columns run towards the posterior, i.e. the nipple points left.
    if orientation and orientation[0].startswith("P"):
        image = image[:, ::-1]
    return MammoImage(
        pixels=np.ascontiguousarray(image, dtype=np.float32),
        pixel_mm=(row_mm, col_mm),
        laterality=laterality,
        view=view,
        instance_number=_instance_number(ds),
        sop_instance_uid=_text(ds, "SOPInstanceUID", upper=False),
    )


def load_mammogram(paths: Sequence[Path]) -> Mammogram:
    """The CC and MLO views of one MG series, normalised (see the module docstring)."""
    if not paths:
        raise VolumeError("no instances")
    datasets = [(_read(Path(p)), Path(p).name) for p in paths]
    series = {_text(ds, "SeriesInstanceUID", upper=False) for ds, _ in datasets}
    if len(series) != 1:
        raise VolumeError(f"instances belong to {len(series)} series; a mammogram is one series")
    chosen: dict[str, tuple[int, Dataset, str, str, str]] = {}
    for ds, name in datasets:
        view = _text(ds, "ViewPosition")
        if view not in TAKEN_POSITIONS:
            continue  # XCC, ML, LM, spot, magnification: not what the model reads
        laterality = _laterality(ds, name)
        key = laterality + view
        number = _instance_number(ds)
        if key not in chosen or number >= chosen[key][0]:  # a repeat exposure replaces the first
            chosen[key] = (number, ds, name, laterality, view)
    if not chosen:
        names = ", ".join(name for _, name in datasets[:4])
        raise VolumeError(f"no CC or MLO view in the series ({len(datasets)} instances: {names})")
    views = {
        key: _image(ds, name, laterality, view)
        for key, (_, ds, name, laterality, view) in sorted(
            chosen.items(), key=lambda item: MAMMO_VIEWS.index(item[0])
        )
    }
    first = datasets[0][0]
    return Mammogram(
        views=views,
        study_uid=_text(first, "StudyInstanceUID", upper=False),
        series_uid=next(iter(series)),
        n_instances=len(datasets),
    )
