"""The committed mammo_birads: Triton configs (CPU, GPU, ONNX variants), weights, metrics, and
that the weights tell suspicious studies from normal ones and suggest a category with a side."""

from __future__ import annotations

import json
import warnings

import numpy as np
import torch
from tritonclient.grpc import model_config_pb2

from models.mammo_birads.phantoms import mammo_study_phantom
from models.mammo_birads.writer import write_mammogram_study
from models.serving import parse_config
from processors.birads import assess
from processors.mammogram import load_mammogram
from processors.preprocessing import MAMMO_INPUT_SHAPE, preprocess_mammogram
from radtriage.settings import REPO_ROOT

MODEL_DIR = REPO_ROOT / "deploy" / "triton" / "model_repository" / "mammo_birads"
METRICS = json.loads((REPO_ROOT / "models" / "mammo_birads" / "metrics.json").read_text())


def test_configs_parse_and_differ_only_in_the_instance_kind() -> None:
    cpu = parse_config((MODEL_DIR / "config.pbtxt").read_text())
    gpu = parse_config((MODEL_DIR / "configs" / "gpu.pbtxt").read_text())
    onnx = parse_config((MODEL_DIR / "configs" / "onnx.pbtxt").read_text())
    assert cpu.name == gpu.name == onnx.name == "mammo_birads" and cpu.backend == "python"
    assert onnx.backend == "onnxruntime"
    assert [g.kind for g in cpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert [g.kind for g in gpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    gpu.ClearField("instance_group")
    cpu.ClearField("instance_group")
    assert cpu == gpu
    assert list(cpu.input[0].dims) == list(MAMMO_INPUT_SHAPE) and cpu.input[0].name == "volume"
    assert [o.name for o in cpu.output] == ["probability", "birads_probabilities"]
    assert list(cpu.output[1].dims) == [MAMMO_INPUT_SHAPE[0], 6]
    assert cpu.dynamic_batching.priority_levels == 3
    params = {k: v.string_value for k, v in cpu.parameters.items()}
    assert params["recommended_threshold"] == f"{METRICS['threshold']:.4f}"
    assert params["finding"] == "BIRADS"


def test_metrics() -> None:
    assert METRICS["input_shape"] == list(MAMMO_INPUT_SHAPE) and METRICS["test_size"] >= 200
    assert METRICS["auc"] >= 0.85 and METRICS["val_operating_point"]["sensitivity"] >= 0.9
    confusion = np.array(METRICS["confusion"])
    # Rows are the true categories 0-5, every test study in exactly one cell (or unassessed).
    assert confusion.shape == (6, 6) and confusion.sum() <= METRICS["test_size"]
    assert (MODEL_DIR / "1" / "model.pt").stat().st_size < 10_000_000


def test_committed_weights_separate_fresh_studies_read_from_dicom(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(MODEL_DIR / "1" / "model.pt"), map_location="cpu").eval()
    rng = np.random.default_rng(919_191)
    categories = [5, 1, 4, 2, 5, 1, 4, 1]
    studies = [mammo_study_phantom(rng, category=c) for c in categories]
    x = np.stack(
        [
            preprocess_mammogram(load_mammogram(write_mammogram_study(s, tmp_path / f"mg{i}")))
            for i, s in enumerate(studies)
        ]
    )
    with torch.no_grad():
        p, per_view = model(torch.from_numpy(x))
    p = p.reshape(-1).numpy()
    assert per_view.shape == (len(studies), *MAMMO_INPUT_SHAPE[:1], 6)
    assert ((p >= 0) & (p <= 1)).all()
    suspicious = np.array([c >= 4 for c in categories])
    assert np.median(p[suspicious]) > np.median(p[~suspicious]) + 0.3, (p, categories)
    threshold = METRICS["threshold"]
    # A flagged study's suggested category is 4 or 5, mostly in the breast the lesion is in
    # (0.84 of the test set's detected 4/5 studies).
    sides = []
    for study, prob, views in zip(studies, p, per_view.numpy(), strict=True):
        a = assess(views.astype(np.float64), threshold, bool(prob >= threshold))
        assert a is not None and (a.category in (4, 5)) == (prob >= threshold)
        if prob >= threshold and study.category >= 4:
            sides.append(a.side == study.side)
    assert len(sides) >= 3 and sum(sides) >= 2 * len(sides) / 3, sides
