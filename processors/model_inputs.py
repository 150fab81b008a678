"""From a series' blob URIs to the tensor a given Triton model expects.

Each served model's spec (models/<name>/spec.py) names the input here it was trained
with: its series loader and preprocessing (the transforms in `processors/preprocessing/`,
shared with training), which is what prevents train/serve skew.

Every preprocessor returns the tensor and the model's geometry: what maps the model's
localising outputs back to the series (the ICH classifier's slice crop and the series'
slice positions; the nodule detector's grid-to-patient affine), or None for a model
whose outputs do not localise. The geometry is small and picklable: it travels back
from the preprocessing process with the tensor.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from models import registry
from processors.dicom_volume import Volume, load_series
from processors.localisation import PlaneField, SeriesGeometry, SliceCrop, series_geometry
from processors.mammogram import Mammogram, load_mammogram
from processors.nodules import NoduleGeometry
from processors.preprocessing import (
    ich_pooling,
    lvo_pooling,
    nodule_pooling,
    preprocess_chest_ct,
    preprocess_cta,
    preprocess_head_ct_with_field,
    preprocess_mammogram,
    preprocess_radiograph,
)
from processors.radiograph import load_radiograph

# What a model's outputs are mapped back to the series with (one type per kind of
# localisation; None: the model does not localise, or this series cannot be localised).
ModelGeometry = SeriesGeometry | NoduleGeometry | None
# What a loader reads a series into: a volume (CT/MR, or one radiograph as a single
# slice), or the views of a mammogram (each its own size and spacing).
Images = Volume | Mammogram
Preprocessor = Callable[[Images], tuple[np.ndarray, ModelGeometry]]
Loader = Callable[[Sequence[Path]], Images]


@dataclass(frozen=True)
class ModelInput:
    """How a model's series is read (`load_series` for CT/MR volumes) and preprocessed."""

    preprocess: Preprocessor
    load: Loader = load_series


class PreparedInput(NamedTuple):
    tensor: np.ndarray
    volume: Images
    geometry: ModelGeometry


def _volume(images: Images) -> Volume:
    if not isinstance(images, Volume):
        raise TypeError(f"expected a Volume, got {type(images).__name__}")
    return images


def ich_geometry(volume: Volume, crop: SliceCrop, field: PlaneField | None = None) -> SeriesGeometry | None:
    """The crop of a (possibly z-pooled) volume as slices of the series itself: a finding's
    slice range must name the instances a viewer shows, not slices of the working grid.
    Pooled slice i averages series slices [i kz, (i + 1) kz), so the crop's pooled slices
    [start, stop) are series slices [start kz, stop kz) — the same extent, still resampled
    linearly onto the model's slices. The in-plane `field` (pooled pixels) becomes the
    series' pixels the same way."""
    _, ky, kx = volume.pool_zyx
    series_field = field.scaled(ky, kx) if field is not None else None
    if volume.pool_zyx[0] == 1:
        return series_geometry(volume, crop, series_field)
    start, stop = volume.series_slices(crop.start, crop.stop)
    if len(volume.hu) != len(volume.positions_mm) or stop <= start:
        return None
    return SeriesGeometry(
        SliceCrop(start, stop, crop.depth),
        volume.series_positions_mm,
        volume.series_instance_numbers,
        series_field,
    )


def _head_ct(images: Images) -> tuple[np.ndarray, ModelGeometry]:
    volume = _volume(images)
    tensor, crop, field = preprocess_head_ct_with_field(volume.hu, volume.spacing_zyx)
    return tensor, ich_geometry(volume, crop, field)


def _cta(images: Images) -> tuple[np.ndarray, ModelGeometry]:
    volume = _volume(images)
    return preprocess_cta(volume.hu, volume.spacing_zyx), None


def _chest_ct(images: Images) -> tuple[np.ndarray, ModelGeometry]:
    # The series' own affine: the nodule map's voxels go back to patient mm through it.
    return preprocess_chest_ct(_volume(images))


def _radiograph(images: Images) -> tuple[np.ndarray, ModelGeometry]:
    return preprocess_radiograph(_volume(images)), None


def _mammogram(images: Images) -> tuple[np.ndarray, ModelGeometry]:
    if not isinstance(images, Mammogram):
        raise TypeError(f"expected a Mammogram, got {type(images).__name__}")
    return preprocess_mammogram(images), None


# The inputs of the reference models, each named by its model's spec (models/<name>/spec.py,
# `input`). CT models read their series onto the working grid their preprocessing declares
# (processors/preprocessing/common.py, "Working grids"): memory and time follow the model's grid,
# not the scanner's matrix.
HEAD_CT = ModelInput(_head_ct, functools.partial(load_series, pool=ich_pooling))
CTA = ModelInput(_cta, functools.partial(load_series, pool=lvo_pooling))
RADIOGRAPH = ModelInput(_radiograph, load_radiograph)
MAMMOGRAM = ModelInput(_mammogram, load_mammogram)
CHEST_CT = ModelInput(_chest_ct, functools.partial(load_series, pool=nodule_pooling))


class UnsupportedModelError(ValueError):
    """A routing rule names a model this processor has no preprocessing for."""


@functools.cache
def _resolve(reference: str) -> ModelInput:
    module, _, attribute = reference.partition(":")
    found = getattr(importlib.import_module(module), attribute, None)
    if not isinstance(found, ModelInput):
        raise TypeError(f"{reference} is not a processors.model_inputs.ModelInput")
    return found


def model_input(model_name: str) -> ModelInput:
    """The series loader and preprocessing its spec names (models/<name>/spec.py, `input`)."""
    try:
        spec = registry.get(model_name)
    except registry.UnknownModelError:
        known = ", ".join(sorted(registry.specs()))
        raise UnsupportedModelError(
            f"no preprocessing registered for model '{model_name}' (known: {known})"
        ) from None
    return _resolve(spec.input)


def prepare_input(model_name: str, paths: Sequence[Path]) -> PreparedInput:
    """Load the series and preprocess it for `model_name` (CPU-bound: run it off the event loop)."""
    spec = model_input(model_name)
    volume = spec.load(paths)
    tensor, geometry = spec.preprocess(volume)
    return PreparedInput(tensor, volume, geometry)


def prepare_for_pool(model_name: str, paths: Sequence[str]) -> tuple[np.ndarray, ModelGeometry]:
    """`prepare_input` for another process: plain-string paths in, the tensor and the (small)
    geometry back — not the HU volume, several times larger and not needed by the caller."""
    tensor, _volume, geometry = prepare_input(model_name, [Path(p) for p in paths])
    return tensor, geometry
