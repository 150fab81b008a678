"""The committed lvo_detector: Triton configs (CPU and GPU variants), weights, metrics."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from tritonclient.grpc import model_config_pb2

from models.lvo_detector.phantoms import cta_phantom
from models.serving import parse_config
from processors.preprocessing import LVO_INPUT_SHAPE, preprocess_cta
from radtriage.settings import REPO_ROOT

REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
MODEL_DIR = REPOSITORY / "lvo_detector"
METRICS = json.loads((REPO_ROOT / "models" / "lvo_detector" / "metrics.json").read_text())


def test_configs_parse_and_differ_only_in_the_instance_kind() -> None:
    cpu = parse_config((MODEL_DIR / "config.pbtxt").read_text())
    gpu = parse_config((MODEL_DIR / "configs" / "gpu.pbtxt").read_text())
    assert cpu.name == gpu.name == "lvo_detector" and cpu.backend == "python"
    assert [g.kind for g in cpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert [g.kind for g in gpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    gpu.ClearField("instance_group")
    cpu.ClearField("instance_group")
    assert cpu == gpu
    assert list(cpu.input[0].dims) == list(LVO_INPUT_SHAPE) and cpu.input[0].name == "volume"
    assert [o.name for o in cpu.output] == ["probability", "side_left_probability"]
    batching = cpu.dynamic_batching
    assert batching.priority_levels == 3 and batching.default_priority_level == 3
    assert batching.default_queue_policy.default_timeout_microseconds > 0
    assert batching.default_queue_policy.allow_timeout_override
    params = {k: v.string_value for k, v in cpu.parameters.items()}
    assert params["recommended_threshold"] == f"{METRICS['threshold']:.4f}"
    assert params["input_shape"] == ", ".join(map(str, LVO_INPUT_SHAPE)) and params["finding"] == "LVO"


def test_metrics_meet_the_critical_route_targets() -> None:
    assert METRICS["input_shape"] == list(LVO_INPUT_SHAPE) and METRICS["test_size"] >= 200
    assert METRICS["auc"] >= 0.9 and METRICS["val_operating_point"]["sensitivity"] >= 0.95
    assert 0.0 < METRICS["threshold"] < 1.0
    assert (MODEL_DIR / "1" / "model.pt").stat().st_size < 10_000_000


def test_committed_weights_detect_occlusions_and_their_side() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(MODEL_DIR / "1" / "model.pt"), map_location="cpu").eval()
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
