"""The sixth model's series loader and preprocessing (processors/model_inputs.ModelInput):
the series as loaded, windowed to contrast-filled vessels and sampled onto a 16 x 32 x 32 grid."""

from __future__ import annotations

import numpy as np

from processors.dicom_volume import Volume, load_series
from processors.model_inputs import Images, ModelGeometry, ModelInput

GRID = (16, 32, 32)


def _ctpa(images: Images) -> tuple[np.ndarray, ModelGeometry]:
    assert isinstance(images, Volume)
    hu = images.hu
    index = np.ix_(
        *(np.linspace(0, n - 1, g).round().astype(int) for n, g in zip(hu.shape, GRID, strict=True))
    )
    window = np.clip((hu[index] - 100.0) / 500.0, 0.0, 1.0).astype(np.float32)
    return window[None], None


CTPA = ModelInput(_ctpa, load_series)
