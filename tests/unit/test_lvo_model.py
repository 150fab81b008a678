"""The committed lvo_detector: Triton configs (CPU and GPU variants), weights, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.lvo_detector.phantoms import cta_phantom
from processors.preprocessing import LVO_INPUT_SHAPE, preprocess_cta
from tests.support.committed_model import check_configs, check_metrics_and_weights, load_weights

NAME = "lvo_detector"


def test_configs_parse_and_differ_only_in_the_instance_kind() -> None:
    check_configs(NAME, LVO_INPUT_SHAPE, ["probability", "side_left_probability"], "LVO")


def test_metrics_meet_the_critical_route_targets() -> None:
    metrics = check_metrics_and_weights(NAME, LVO_INPUT_SHAPE)
    assert metrics["auc"] >= 0.9 and metrics["val_operating_point"]["sensitivity"] >= 0.95
    assert 0.0 < metrics["threshold"] < 1.0


def test_committed_weights_detect_occlusions_and_their_side() -> None:
    model = load_weights(NAME)
    rng = np.random.default_rng(818_181)  # no training, validation or test seed
    cases = [cta_phantom(rng, lvo=i % 2 == 0, side=("left", "right")[i // 2 % 2]) for i in range(8)]
    x = torch.from_numpy(np.stack([preprocess_cta(c.hu, c.spacing_zyx) for c in cases]))
    with torch.no_grad():
        p_lvo, p_left = (t.reshape(-1).numpy() for t in model(x))
        one, _ = model(x[:1])
    assert float(one.reshape(-1)[0]) == pytest.approx(float(p_lvo[0]), abs=1e-5)
    assert ((p_lvo >= 0) & (p_lvo <= 1) & (p_left >= 0) & (p_left <= 1)).all()
    pos = p_lvo[[c.has_lvo for c in cases]]
    neg = p_lvo[[not c.has_lvo for c in cases]]
    assert np.median(pos) > np.median(neg), (pos, neg)  # a constant or random net cannot do this
    sides = [(c.side == "left") == (p_left[i] >= 0.5) for i, c in enumerate(cases) if c.has_lvo]
    assert sum(sides) >= 3, (sides, p_left)
