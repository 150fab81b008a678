"""The one preprocessing of each model, shared by training and serving (no train/serve skew).

Head CT for ICH: strip bone, apply a blood-sensitive window, resample to a fixed grid
covering the head. The grid (32 x 96 x 96) keeps CPU inference in tens of milliseconds while a
haematoma of 4 mm radius still spans a few voxels in-plane.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Compose, Resize, ScaleIntensityRange
from scipy import ndimage

ICH_INPUT_SHAPE = (1, 32, 96, 96)
# Window from just below water to just above clotted blood: parenchyma ~0.4, acute blood
# 0.6-0.9, bone and air saturate (their detail does not help find blood).
ICH_WINDOW_HU = (-20.0, 100.0)
# Bone and its partial-volume rim look like blood once windowed; they are removed first
# (a crude skull strip), so what is bright inside the head is what the model must judge.
BONE_HU = 150.0

_ich_transform = Compose(
    [
        ScaleIntensityRange(a_min=ICH_WINDOW_HU[0], a_max=ICH_WINDOW_HU[1], b_min=0.0, b_max=1.0, clip=True),
        Resize(spatial_size=ICH_INPUT_SHAPE[1:], mode="trilinear", align_corners=False),
    ]
)


def preprocess_head_ct(hu: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """(z, y, x) HU volume → float32 array of ICH_INPUT_SHAPE in [0, 1].

    Windowing before resizing keeps the skull's 1000+ HU from bleeding into the
    brain edge through interpolation. Spacing is accepted for the signature other
    preprocessors need; the phantoms and typical head CTs cover a similar field.
    """
    if hu.ndim != 3 or min(hu.shape) < 2:
        raise ValueError(f"expected a 3D volume with at least 2 voxels per axis, got shape {hu.shape}")
    bone = ndimage.binary_dilation(hu > BONE_HU, structure=np.ones((1, 3, 3), dtype=bool))
    stripped = np.where(bone, ICH_WINDOW_HU[0], hu).astype(np.float32)
    with torch.no_grad():
        out = _ich_transform(torch.as_tensor(stripped[np.newaxis], dtype=torch.float32))
    return np.asarray(out, dtype=np.float32)
