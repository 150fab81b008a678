"""The committed nodule_detector: Triton configs (CPU, GPU, ONNX variants), weights, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.nodule_detector.phantoms import chest_ct_phantom
from processors.nodules import find_nodules
from processors.preprocessing import NODULE_INPUT_SHAPE, preprocess_chest_ct
from tests.support.committed_model import (
    check_configs,
    check_metrics_and_weights,
    load_weights,
    metrics,
    model_dir,
)

NAME = "nodule_detector"
MODEL_DIR = model_dir(NAME)
METRICS = metrics(NAME)
# What models/evaluate.py reads for every model, and what this model adds.
FIELDS = (
    "model version finding threshold threshold_rule target_sensitivity auc sensitivity specificity "
    "accuracy val_auc val_operating_point train_size val_size test_size epochs seed training_seconds "
    "threads input_shape parameters weights_file weights_bytes torch monai nodule_detection"
).split()


def test_configs_parse_and_differ_only_in_the_instance_kind() -> None:
    cpu = check_configs(NAME, NODULE_INPUT_SHAPE, ["probability", "nodule_map"], "NODULE")
    assert list(cpu.output[0].dims) == [1] and list(cpu.output[1].dims) == [1, *NODULE_INPUT_SHAPE[1:]]


def test_metrics_fields_and_weights_size() -> None:
    check_metrics_and_weights(NAME, NODULE_INPUT_SHAPE)
    missing = [f for f in FIELDS if f not in METRICS]
    assert not missing, missing
    assert METRICS["model"] == "nodule_detector" and METRICS["finding"] == "NODULE"
    assert set(METRICS["val_operating_point"]) >= {"sensitivity", "specificity"}
    assert METRICS["val_operating_point"]["sensitivity"] >= 0.95 and 0.0 < METRICS["threshold"] < 1.0
    detection = METRICS["nodule_detection"]
    assert set(detection["by_size_mm"]) == {"<6", "6-10", "10-20", ">=20"}
    assert set(detection["by_kind"]) == {"solid", "ground_glass"}
    for key in ("false_positives_per_study", "median_centre_error_mm", "median_abs_diameter_error_mm"):
        assert detection[key] >= 0
    weights = MODEL_DIR / "1" / METRICS["weights_file"]
    assert weights.stat().st_size == METRICS["weights_bytes"] <= 5_000_000
    assert (MODEL_DIR / "1" / "model.onnx").stat().st_size <= 5_000_000


def test_committed_weights_find_a_nodule() -> None:
    model = load_weights(NAME)
    rng = np.random.default_rng(919_191)  # no training, validation or test seed
    cases = [
        # >= 10 mm: what the model finds (test sensitivity 0.81 at 10-20 mm, 0.97 above;
        # below 6 mm it finds none, models/EVALUATION.md).
        chest_ct_phantom(rng, nodules=1, kinds=("solid",), min_diameter_mm=12.0),
        chest_ct_phantom(rng, nodules=0),
    ]
    prepared = [preprocess_chest_ct(c.hu, c.spacing_zyx) for c in cases]
    x = torch.from_numpy(np.stack([p[0] for p in prepared]))
    with torch.no_grad():
        probability, nodule_map = model(x)
        one, _ = model(x[:1])
    assert probability.shape == (2, 1) and nodule_map.shape == (2, 1, *NODULE_INPUT_SHAPE[1:])
    assert float(one[0, 0]) == pytest.approx(float(probability[0, 0]), abs=1e-5)
    assert float(nodule_map.amax(dim=(1, 2, 3, 4))[0]) == pytest.approx(float(probability[0, 0]), abs=1e-6)
    assert float(probability[0, 0]) > float(probability[1, 0])  # a constant or random net cannot do this
    truth = cases[0].nodules[0]
    found = find_nodules(nodule_map[0].numpy(), prepared[0][1], METRICS["threshold"])
    assert found, "no nodule found at the committed threshold"
    distance = min(np.linalg.norm(np.subtract(f.centre_lps_mm, truth.centre_lps_mm)) for f in found)
    assert distance <= max(5.0, truth.diameter_mm / 2), (found, truth)
