"""The committed cxr_triage: Triton configs (CPU and GPU variants), weights, metrics."""

from __future__ import annotations

import numpy as np
import torch

from models.cxr_triage.phantoms import chest_radiograph_phantom
from processors.preprocessing import CXR_INPUT_SHAPE, preprocess_radiograph
from tests.support.committed_model import check_configs, check_metrics_and_weights, load_weights

NAME = "cxr_triage"


def test_configs_parse_and_differ_only_in_the_instance_kind() -> None:
    check_configs(NAME, CXR_INPUT_SHAPE, ["probability"], "CXR_CRITICAL")


def test_metrics() -> None:
    metrics = check_metrics_and_weights(NAME, CXR_INPUT_SHAPE)
    assert metrics["auc"] >= 0.9 and metrics["val_operating_point"]["sensitivity"] >= 0.95


def test_committed_weights_separate_fresh_radiographs() -> None:
    model = load_weights(NAME)
    rng = np.random.default_rng(828_282)
    cases = [chest_radiograph_phantom(rng, pneumothorax=i % 2 == 0, min_rim_fraction=0.15) for i in range(10)]
    x = torch.from_numpy(np.stack([preprocess_radiograph(c.pixels, c.pixel_mm) for c in cases]))
    with torch.no_grad():
        p = model(x).reshape(-1).numpy()
    assert ((p >= 0) & (p <= 1)).all()
    pos = p[[c.has_pneumothorax for c in cases]]
    neg = p[[not c.has_pneumothorax for c in cases]]
    assert np.median(pos) > np.median(neg) + 0.3, (pos, neg)
