"""The one preprocessing of each model, shared by training and serving (no train/serve skew).

A model's spec names its input (processors/model_inputs.py), which loads the series and
calls one of these; its training script (models/<name>/train.py) trains on exactly what
the same function returns. One module per kind of study:

- `head_ct`: head CT for ICH (brain, blood and bone windows, bone strip, crop, resize);
- `cta`: CT angiography of the head and neck for LVO (slab MIPs, midline, asymmetry);
- `radiograph`: chest radiograph for pneumothorax triage;
- `mammogram`: the four standard mammography views for BI-RADS;
- `chest_ct`: chest CT for lung nodules (a fixed 2.5 mm grid on the lungs);
- `common`: what they share (windows, the lean anti-aliased resize, volume and mask
  checks, the loader's working-grid pooling).
"""

from __future__ import annotations

from processors.preprocessing.chest_ct import (
    NODULE_BODY_HU,
    NODULE_FULL_RESOLUTION_MAX,
    NODULE_GRID_MM,
    NODULE_INPUT_SHAPE,
    NODULE_LUNG_CLOSING_VOXELS,
    NODULE_WINDOW_HU,
    nodule_pooling,
    preprocess_chest_ct,
    preprocess_chest_ct_with_mask,
)
from processors.preprocessing.common import (
    ANTI_ALIAS_FROM,
    WINDOW_SLAB,
)
from processors.preprocessing.cta import (
    BODY_HU,
    CTA_ASYMMETRY_GAIN,
    CTA_ASYMMETRY_SIGMA,
    CTA_BONE_HU,
    CTA_BONE_WINDOW_HU,
    CTA_MIDLINE_BAND,
    CTA_SHIFT_SEARCH,
    CTA_VESSEL_WINDOW_HU,
    CTA_YAW_SEARCH,
    LVO_INPUT_SHAPE,
    LVO_WORKING_GRID,
    lvo_pooling,
    preprocess_cta,
    preprocess_cta_with_mask,
)
from processors.preprocessing.head_ct import (
    BONE_HU,
    FOREGROUND_LEVEL,
    ICH_BLOOD_WINDOW_HU,
    ICH_BONE_WINDOW_HU,
    ICH_INPUT_SHAPE,
    ICH_WINDOW_HU,
    ICH_WORKING_GRID,
    ich_pooling,
    preprocess_head_ct,
    preprocess_head_ct_with_crop,
    preprocess_head_ct_with_field,
    preprocess_head_ct_with_mask,
)
from processors.preprocessing.mammogram import (
    MAMMO_INPUT_SHAPE,
    MAMMO_PERCENTILES,
    MAMMO_PIXEL_MM,
    MAMMO_VIEW_SHAPE,
    preprocess_mammo_view,
    preprocess_mammogram,
)
from processors.preprocessing.radiograph import (
    CXR_INPUT_SHAPE,
    CXR_PERCENTILES,
    preprocess_radiograph,
    preprocess_radiograph_with_mask,
)

__all__ = [
    "ANTI_ALIAS_FROM",
    "BODY_HU",
    "BONE_HU",
    "CTA_ASYMMETRY_GAIN",
    "CTA_ASYMMETRY_SIGMA",
    "CTA_BONE_HU",
    "CTA_BONE_WINDOW_HU",
    "CTA_MIDLINE_BAND",
    "CTA_SHIFT_SEARCH",
    "CTA_VESSEL_WINDOW_HU",
    "CTA_YAW_SEARCH",
    "CXR_INPUT_SHAPE",
    "CXR_PERCENTILES",
    "FOREGROUND_LEVEL",
    "ICH_BLOOD_WINDOW_HU",
    "ICH_BONE_WINDOW_HU",
    "ICH_INPUT_SHAPE",
    "ICH_WINDOW_HU",
    "ICH_WORKING_GRID",
    "LVO_INPUT_SHAPE",
    "LVO_WORKING_GRID",
    "MAMMO_INPUT_SHAPE",
    "MAMMO_PERCENTILES",
    "MAMMO_PIXEL_MM",
    "MAMMO_VIEW_SHAPE",
    "NODULE_BODY_HU",
    "NODULE_FULL_RESOLUTION_MAX",
    "NODULE_GRID_MM",
    "NODULE_INPUT_SHAPE",
    "NODULE_LUNG_CLOSING_VOXELS",
    "NODULE_WINDOW_HU",
    "WINDOW_SLAB",
    "ich_pooling",
    "lvo_pooling",
    "nodule_pooling",
    "preprocess_chest_ct",
    "preprocess_chest_ct_with_mask",
    "preprocess_cta",
    "preprocess_cta_with_mask",
    "preprocess_head_ct",
    "preprocess_head_ct_with_crop",
    "preprocess_head_ct_with_field",
    "preprocess_head_ct_with_mask",
    "preprocess_mammo_view",
    "preprocess_mammogram",
    "preprocess_radiograph",
    "preprocess_radiograph_with_mask",
]
