"""From a series' blob URIs to the tensor a given Triton model expects.

Each served model names the preprocessing it was trained with; keeping the mapping
here (and the transforms in `processors/preprocessing.py`, shared with training)
is what prevents train/serve skew.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from processors.dicom_volume import Volume, load_series
from processors.localisation import SeriesGeometry, SliceCrop, series_geometry
from processors.preprocessing import (
    preprocess_cta,
    preprocess_head_ct,
    preprocess_head_ct_with_crop,
    preprocess_radiograph,
)
from processors.radiograph import load_radiograph

Preprocessor = Callable[[Volume], np.ndarray]
CroppingPreprocessor = Callable[[Volume], tuple[np.ndarray, SliceCrop]]
Loader = Callable[[Sequence[Path]], Volume]


def _head_ct(volume: Volume) -> np.ndarray:
    return preprocess_head_ct(volume.hu, volume.spacing_zyx)


def _head_ct_cropped(volume: Volume) -> tuple[np.ndarray, SliceCrop]:
    return preprocess_head_ct_with_crop(volume.hu, volume.spacing_zyx)


def _cta(volume: Volume) -> np.ndarray:
    return preprocess_cta(volume.hu, volume.spacing_zyx)


def _radiograph(volume: Volume) -> np.ndarray:
    return preprocess_radiograph(volume)


PREPROCESSORS: dict[str, Preprocessor] = {
    "ich_classifier": _head_ct,
    "lvo_detector": _cta,
    "cxr_triage": _radiograph,
}
# Models whose outputs localise (processors/localisation.py): the same tensor as their
# PREPROCESSORS entry, plus the slices of the series it covers.
CROPPING_PREPROCESSORS: dict[str, CroppingPreprocessor] = {
    "ich_classifier": _head_ct_cropped,
}
# How a model's series is read, where it is not a CT/MR volume (`load_series`).
LOADERS: dict[str, Loader] = {
    "cxr_triage": load_radiograph,
}


class UnsupportedModelError(ValueError):
    """A routing rule names a model this processor has no preprocessing for."""


def prepare_model_input(model_name: str, paths: Sequence[Path]) -> tuple[np.ndarray, Volume]:
    """Load the series and preprocess it for `model_name` (CPU-bound: run in a thread)."""
    tensor, volume, _ = prepare_located_input(model_name, paths)
    return tensor, volume


def prepare_located_input(
    model_name: str, paths: Sequence[Path]
) -> tuple[np.ndarray, Volume, SeriesGeometry | None]:
    """`prepare_model_input` plus, for a model that localises, what maps its model slices
    back to the series' slices (None for other models)."""
    try:
        preprocess = PREPROCESSORS[model_name]
    except KeyError:
        raise UnsupportedModelError(
            f"no preprocessing registered for model '{model_name}' "
            f"(known: {', '.join(sorted(PREPROCESSORS))})"
        ) from None
    volume = LOADERS.get(model_name, load_series)(paths)
    cropping = CROPPING_PREPROCESSORS.get(model_name)
    if cropping is None:
        return preprocess(volume), volume, None
    tensor, crop = cropping(volume)
    return tensor, volume, series_geometry(volume, crop)


def prepare_tensor(model_name: str, paths: Sequence[str]) -> np.ndarray:
    """`prepare_model_input` for another process: plain-string paths in, only the tensor back
    (the HU volume is several times larger and the caller does not need it)."""
    tensor, _geometry = prepare_tensor_and_geometry(model_name, paths)
    return tensor


def prepare_tensor_and_geometry(
    model_name: str, paths: Sequence[str]
) -> tuple[np.ndarray, SeriesGeometry | None]:
    """`prepare_located_input` for another process: the tensor and the (small) geometry."""
    tensor, _volume, geometry = prepare_located_input(model_name, [Path(p) for p in paths])
    return tensor, geometry
