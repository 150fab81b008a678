"""A committed model's files as its unit test reads them (tests/unit/test_<model>_model.py):
its Triton configs, its metrics and its TorchScript weights, and the checks every model's
files pass the same way, so each model's test states only what is its own."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tritonclient.grpc import model_config_pb2

from models.serving import parse_config
from radtriage.settings import REPO_ROOT

REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
# What a committed model.pt may weigh at most (a few MB is the budget for committed weights).
MAX_WEIGHTS_BYTES = 10_000_000


def model_dir(name: str) -> Path:
    return REPOSITORY / name


def metrics(name: str) -> dict[str, Any]:
    """The metrics file the training run of the committed weights wrote."""
    loaded: dict[str, Any] = json.loads((REPO_ROOT / "models" / name / "metrics.json").read_text())
    return loaded


def load_weights(name: str) -> torch.jit.ScriptModule:
    """The committed version 1 weights, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch 2.15
        model: torch.jit.ScriptModule = torch.jit.load(
            str(model_dir(name) / "1" / "model.pt"), map_location="cpu"
        ).eval()
    return model


def check_configs(
    name: str, input_shape: Sequence[int], outputs: Sequence[str], finding: str
) -> model_config_pb2.ModelConfig:
    """config.pbtxt, configs/gpu.pbtxt and configs/onnx.pbtxt parse; the CPU and GPU ones
    differ only in the instance kind and declare the model's input, outputs, lanes'
    batching and parameters. Returns the CPU config (instance group cleared) for the
    model's own checks."""
    directory = model_dir(name)
    cpu = parse_config((directory / "config.pbtxt").read_text())
    gpu = parse_config((directory / "configs" / "gpu.pbtxt").read_text())
    onnx = parse_config((directory / "configs" / "onnx.pbtxt").read_text())
    assert cpu.name == gpu.name == onnx.name == name and cpu.backend == "python"
    assert onnx.backend == "onnxruntime" and onnx.default_model_filename == "model.onnx"
    assert cpu.max_batch_size >= 4
    assert [g.kind for g in cpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert [g.kind for g in gpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    gpu.ClearField("instance_group")
    cpu.ClearField("instance_group")
    assert cpu == gpu
    assert list(cpu.input[0].dims) == list(input_shape) and cpu.input[0].name == "volume"
    assert [o.name for o in cpu.output] == list(outputs)
    batching = cpu.dynamic_batching
    assert batching.priority_levels == 3 and batching.default_priority_level == 3
    assert batching.default_queue_policy.default_timeout_microseconds > 0
    assert batching.default_queue_policy.allow_timeout_override
    params = {k: v.string_value for k, v in cpu.parameters.items()}
    assert params["recommended_threshold"] == f"{metrics(name)['threshold']:.4f}"
    assert params["input_shape"] == ", ".join(map(str, input_shape)) and params["finding"] == finding
    return cpu


def check_metrics_and_weights(name: str, input_shape: Sequence[int]) -> dict[str, Any]:
    """The metrics describe the served input and a test set large enough to mean much, and
    the weights fit the budget. Returns the metrics for the model's own checks."""
    m = metrics(name)
    assert m["input_shape"] == list(input_shape) and m["test_size"] >= 200
    assert (model_dir(name) / "1" / "model.pt").stat().st_size < MAX_WEIGHTS_BYTES
    return m
