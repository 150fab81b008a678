"""The committed nodule_detector: Triton configs (CPU, GPU, ONNX variants), weights, metrics."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from tritonclient.grpc import model_config_pb2

from models.nodule_detector.phantoms import chest_ct_phantom
from models.serving import parse_config
from processors.nodules import find_nodules
from processors.preprocessing import NODULE_INPUT_SHAPE, preprocess_chest_ct
from radtriage.settings import REPO_ROOT

MODEL_DIR = REPO_ROOT / "deploy" / "triton" / "model_repository" / "nodule_detector"
METRICS = json.loads((REPO_ROOT / "models" / "nodule_detector" / "metrics.json").read_text())
# What models/evaluate.py reads for every model, and what this model adds.
FIELDS = (
    "model version finding threshold threshold_rule target_sensitivity auc sensitivity specificity "
    "accuracy val_auc val_operating_point train_size val_size test_size epochs seed training_seconds "
    "threads input_shape parameters weights_file weights_bytes torch monai nodule_detection"
).split()


def test_configs_parse_and_differ_only_in_the_instance_kind() -> None:
    cpu = parse_config((MODEL_DIR / "config.pbtxt").read_text())
    gpu = parse_config((MODEL_DIR / "configs" / "gpu.pbtxt").read_text())
    onnx = parse_config((MODEL_DIR / "configs" / "onnx.pbtxt").read_text())
    assert cpu.name == gpu.name == onnx.name == "nodule_detector" and cpu.backend == "python"
    assert onnx.backend == "onnxruntime" and onnx.default_model_filename == "model.onnx"
    assert [g.kind for g in cpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert [g.kind for g in gpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    gpu.ClearField("instance_group")
    cpu.ClearField("instance_group")
    assert cpu == gpu
    assert list(cpu.input[0].dims) == list(NODULE_INPUT_SHAPE) and cpu.input[0].name == "volume"
    assert [o.name for o in cpu.output] == ["probability", "nodule_map"]
    assert list(cpu.output[0].dims) == [1] and list(cpu.output[1].dims) == [1, *NODULE_INPUT_SHAPE[1:]]
    batching = cpu.dynamic_batching
    assert batching.priority_levels == 3 and batching.default_priority_level == 3
    assert batching.default_queue_policy.default_timeout_microseconds > 0
    params = {k: v.string_value for k, v in cpu.parameters.items()}
    assert params["recommended_threshold"] == f"{METRICS['threshold']:.4f}"
    assert params["input_shape"] == ", ".join(map(str, NODULE_INPUT_SHAPE)) and params["finding"] == "NODULE"


def test_metrics_fields_and_weights_size() -> None:
    missing = [f for f in FIELDS if f not in METRICS]
    assert not missing, missing
    assert METRICS["model"] == "nodule_detector" and METRICS["finding"] == "NODULE"
    assert METRICS["input_shape"] == list(NODULE_INPUT_SHAPE) and METRICS["test_size"] >= 200
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(MODEL_DIR / "1" / "model.pt"), map_location="cpu").eval()
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
