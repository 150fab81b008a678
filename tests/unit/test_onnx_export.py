"""The ONNX variant of every served model (models/onnx_export.py): in step with the served
TorchScript, computing the same outputs in ONNX Runtime, and configured like the GPU config
but for the backend. Stale or edited variants must be caught."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from tritonclient.grpc import model_config_pb2

from models.onnx_export import (
    ONNX_FILE,
    TOLERANCE,
    export_onnx,
    largest_difference,
    problems,
    served_models,
)
from models.serving import MODEL_FILE, parse_config
from radtriage.settings import REPO_ROOT

REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
MODELS = [p.name for p in served_models(REPOSITORY)]
KIND = model_config_pb2.ModelInstanceGroup


@pytest.mark.parametrize("model", MODELS)
def test_the_committed_onnx_variant_computes_what_the_served_weights_compute(model: str) -> None:
    assert problems(REPOSITORY / model) == []
    assert largest_difference(REPOSITORY / model, rows=5) <= TOLERANCE


@pytest.mark.parametrize("model", MODELS)
def test_the_onnx_config_is_the_gpu_config_on_the_onnx_runtime_backend(model: str) -> None:
    onnx = parse_config((REPOSITORY / model / "configs" / "onnx.pbtxt").read_text())
    gpu = parse_config((REPOSITORY / model / "configs" / "gpu.pbtxt").read_text())
    assert onnx.platform == "onnxruntime_onnx"
    assert (onnx.backend, onnx.default_model_filename) == ("onnxruntime", ONNX_FILE)
    assert gpu.backend == "python"
    assert [g.kind for g in onnx.instance_group] == [KIND.KIND_GPU]
    for field in ("platform", "backend", "default_model_filename"):
        onnx.ClearField(field)  # type: ignore[arg-type]
        gpu.ClearField(field)  # type: ignore[arg-type]
    assert onnx == gpu


def _copy(model: str, tmp_path: Path) -> Path:
    out = tmp_path / model
    shutil.copytree(REPOSITORY / model, out, ignore=shutil.ignore_patterns("__pycache__"))
    return out


def test_an_export_round_trip_reproduces_a_variant_in_step(tmp_path: Path) -> None:
    model_dir = _copy("cxr_triage", tmp_path)
    (model_dir / "1" / ONNX_FILE).unlink()
    (model_dir / "configs" / "onnx.pbtxt").unlink()
    assert problems(model_dir) != []
    onnx_path, config_path, worst = export_onnx(model_dir)
    assert onnx_path.is_file() and config_path.is_file() and worst <= TOLERANCE
    assert problems(model_dir) == []
    assert config_path.read_text() == (REPOSITORY / "cxr_triage" / "configs" / "onnx.pbtxt").read_text()


def test_weights_retrained_without_a_new_export_are_caught(tmp_path: Path) -> None:
    model_dir = _copy("cxr_triage", tmp_path)
    weights = model_dir / "1" / MODEL_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(weights), map_location="cpu")
    with torch.no_grad():
        for p in scripted.parameters():
            p.add_(0.05)
    scripted.save(str(weights))
    found = problems(model_dir)
    assert found and "differs from model.pt" in found[0]


def test_an_edited_onnx_config_is_caught(tmp_path: Path) -> None:
    model_dir = _copy("lvo_detector", tmp_path)
    config = model_dir / "configs" / "onnx.pbtxt"
    config.write_text(config.read_text().replace("KIND_GPU", "KIND_CPU"))
    assert any("does not follow configs/gpu.pbtxt" in p for p in problems(model_dir))


def test_an_onnx_graph_with_other_tensor_names_is_caught(tmp_path: Path) -> None:
    model_dir = _copy("lvo_detector", tmp_path)
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text().replace('"side_left_probability"', '"side_probability"'))
    assert any("differ from the config's" in p for p in problems(model_dir))
