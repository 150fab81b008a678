"""The committed cxr_triage: Triton configs (CPU and GPU variants), weights, metrics."""

from __future__ import annotations

import json
import warnings

import numpy as np
import torch
from tritonclient.grpc import model_config_pb2

from models.cxr_triage.phantoms import chest_radiograph_phantom
from models.serving import parse_config
from processors.preprocessing import CXR_INPUT_SHAPE, preprocess_radiograph
from radtriage.settings import REPO_ROOT

MODEL_DIR = REPO_ROOT / "deploy" / "triton" / "model_repository" / "cxr_triage"
METRICS = json.loads((REPO_ROOT / "models" / "cxr_triage" / "metrics.json").read_text())


def test_configs_parse_and_differ_only_in_the_instance_kind() -> None:
    cpu = parse_config((MODEL_DIR / "config.pbtxt").read_text())
    gpu = parse_config((MODEL_DIR / "configs" / "gpu.pbtxt").read_text())
    assert cpu.name == "cxr_triage" and cpu.backend == "python" and cpu.max_batch_size >= 4
    assert [g.kind for g in cpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert [g.kind for g in gpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    gpu.ClearField("instance_group")
    cpu.ClearField("instance_group")
    assert cpu == gpu
    assert list(cpu.input[0].dims) == list(CXR_INPUT_SHAPE) and cpu.input[0].name == "volume"
    assert [o.name for o in cpu.output] == ["probability"]
    assert cpu.dynamic_batching.priority_levels == 3
    params = {k: v.string_value for k, v in cpu.parameters.items()}
    assert params["recommended_threshold"] == f"{METRICS['threshold']:.4f}"
    assert params["finding"] == "CXR_CRITICAL"


def test_metrics() -> None:
    assert METRICS["input_shape"] == list(CXR_INPUT_SHAPE) and METRICS["test_size"] >= 200
    assert METRICS["auc"] >= 0.9 and METRICS["val_operating_point"]["sensitivity"] >= 0.95
    assert (MODEL_DIR / "1" / "model.pt").stat().st_size < 10_000_000


def test_committed_weights_separate_fresh_radiographs() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(MODEL_DIR / "1" / "model.pt"), map_location="cpu").eval()
    rng = np.random.default_rng(828_282)
    cases = [chest_radiograph_phantom(rng, pneumothorax=i % 2 == 0, min_rim_fraction=0.15) for i in range(10)]
    x = torch.from_numpy(np.stack([preprocess_radiograph(c.pixels, c.pixel_mm) for c in cases]))
    with torch.no_grad():
        p = model(x).reshape(-1).numpy()
    assert ((p >= 0) & (p <= 1)).all()
    pos = p[[c.has_pneumothorax for c in cases]]
    neg = p[[not c.has_pneumothorax for c in cases]]
    assert np.median(pos) > np.median(neg) + 0.3, (pos, neg)
