"""Every served model's two Triton configs and its model.py.

config.pbtxt (KIND_CPU, the local stack) and configs/gpu.pbtxt (KIND_GPU, a production
server started with `--model-config-name=gpu`) are generated from one template per model
by models/serving.py; here they are parsed as Triton's own ModelConfig protobuf (the
model_config_pb2 tritonclient ships) and must be the same config but for the instance
kind. The Python-backend model.py is one file (deploy/triton/python_backend/model.py) copied
into every model's version directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2

from models.serving import BACKEND_SOURCE, install_backend, parse_config
from radtriage.settings import REPO_ROOT

REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
MODELS = sorted(p.name for p in REPOSITORY.iterdir() if (p / "config.pbtxt").is_file())
KIND = model_config_pb2.ModelInstanceGroup


def test_the_repository_holds_every_reference_model() -> None:
    assert {"ich_classifier", "lvo_detector", "cxr_triage"} <= set(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_cpu_and_gpu_configs_parse_and_differ_only_in_the_instance_kind(model: str) -> None:
    cpu = parse_config((REPOSITORY / model / "config.pbtxt").read_text())
    gpu_path = REPOSITORY / model / "configs" / "gpu.pbtxt"
    assert gpu_path.is_file(), f"{model} has no production configs/gpu.pbtxt"
    gpu = parse_config(gpu_path.read_text())
    assert cpu.name == gpu.name == model
    assert [g.kind for g in cpu.instance_group] == [KIND.KIND_CPU]
    assert [g.kind for g in gpu.instance_group] == [KIND.KIND_GPU]
    assert [g.count for g in cpu.instance_group] == [g.count for g in gpu.instance_group]
    cpu.ClearField("instance_group")
    gpu.ClearField("instance_group")
    assert cpu == gpu
    # What every radtriage client relies on: the "probability" output, 3 priority levels.
    assert "probability" in [o.name for o in cpu.output]
    assert cpu.dynamic_batching.priority_levels == 3
    # Every version directory loads: the routing rules pick the version (model_version).
    assert cpu.version_policy.WhichOneof("policy_choice") == "all"


def test_every_version_directory_has_the_one_python_backend() -> None:
    source = BACKEND_SOURCE.read_text()
    versions = [v for m in MODELS for v in (REPOSITORY / m).iterdir() if v.name.isdigit()]
    assert versions
    stale = [str(v.relative_to(REPOSITORY)) for v in versions if (v / "model.py").read_text() != source]
    assert not stale, f"model.py differs from {BACKEND_SOURCE.relative_to(REPO_ROOT)} in {stale}"


def test_an_export_installs_the_backend_next_to_the_weights(tmp_path: Path) -> None:
    out = tmp_path / "some_model" / "2"
    out.mkdir(parents=True)
    assert install_backend(out).read_text() == BACKEND_SOURCE.read_text()


@pytest.mark.parametrize("script", ["ich_classifier.train", "lvo_detector.train", "cxr_triage.train"])
def test_the_committed_configs_are_what_their_training_script_generates(script: str, tmp_path: Path) -> None:
    """The committed files are the template's output (`python -m models.<script> --configs-only`)."""
    import importlib

    module = importlib.import_module(f"models.{script}")
    model = module.DEFAULT_OUT.parent.name
    out = tmp_path / model / "1"
    written = module.write_configs_only(out)
    assert [p.relative_to(out.parent) for p in written] == [Path("config.pbtxt"), Path("configs/gpu.pbtxt")]
    for path in written:
        committed = REPOSITORY / model / path.relative_to(out.parent)
        assert path.read_text() == committed.read_text(), committed
