"""Every served model's two Triton configs and its model.py.

config.pbtxt (KIND_CPU, the local stack) and configs/gpu.pbtxt (KIND_GPU, a production
server started with `--model-config-name=gpu`) are generated from each model's spec
(`SPEC.serving`) by models/serving.py; here they are parsed as Triton's own ModelConfig protobuf (the
model_config_pb2 tritonclient ships) and must be the same config but for the instance
kind. The Python-backend model.py is one file (deploy/triton/python_backend/model.py), of
which every model's version directory gets a generated copy (models/backend.py), never
committed.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tritonclient.grpc import model_config_pb2

from models import backend, registry, training
from models.serving import BACKEND_SOURCE, check_served, install_backend, parse_config
from models.spec import Tensor
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


def test_the_one_python_backend_is_the_only_committed_model_py() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "--", "deploy/triton"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    # The tests run in a clone (CI's is a fresh one): nothing tracked means the repository moved.
    assert tracked, "git tracks nothing under deploy/triton"
    assert [t for t in tracked if t.endswith("/model.py")] == ["deploy/triton/python_backend/model.py"]


def test_serving_a_repository_generates_every_version_directorys_model_py(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    for model in MODELS:
        shutil.copytree(REPOSITORY / model, repository / model, ignore=shutil.ignore_patterns("model.*"))
    (repository / "own" / "1").mkdir(parents=True)
    (repository / "own" / "config.pbtxt").write_text('name: "own"\nbackend: "python"\n')
    (repository / "own" / "1" / "model.py").write_text("# a model's own backend\n")
    stale = repository / MODELS[0] / "1" / "model.py"
    stale.write_text(backend.HEADER + "# an older copy\n")

    written = backend.install_all(repository)
    assert written == [repository / m / "1" / "model.py" for m in MODELS]
    assert all(p.read_text() == backend.HEADER + BACKEND_SOURCE.read_text() for p in written)
    assert (repository / "own" / "1" / "model.py").read_text() == "# a model's own backend\n"


def test_an_export_installs_the_backend_next_to_the_weights(tmp_path: Path) -> None:
    out = tmp_path / "some_model" / "2"
    out.mkdir(parents=True)
    assert install_backend(out).read_text() == backend.generated()


@pytest.mark.parametrize("model", MODELS)
def test_the_committed_configs_are_what_their_spec_generates(model: str, tmp_path: Path) -> None:
    """The committed files are what `python -m models.<model>.train --configs-only` writes:
    SPEC.serving through models/serving.py, with the committed run's threshold and version."""
    spec = registry.get(model)
    out = tmp_path / model / "1"
    written = training.committed_configs(spec, out, training.metrics_path(spec))
    assert [p.relative_to(out.parent) for p in written] == [Path("config.pbtxt"), Path("configs/gpu.pbtxt")]
    for path in written:
        committed = REPOSITORY / model / path.relative_to(out.parent)
        assert path.read_text() == committed.read_text(), committed
    config = parse_config(written[0].read_text())
    served = spec.serving
    assert served is not None
    assert [(t.name, tuple(t.dims)) for t in config.input] == [(served.input.name, served.input.dims)]
    assert [(t.name, tuple(t.dims)) for t in config.output] == [(o.name, o.dims) for o in served.outputs]


def test_a_served_module_that_is_not_its_spec_is_refused() -> None:
    spec = registry.get("lvo_detector")
    assert spec.serving is not None
    shape = spec.serving.input.dims
    one = torch.zeros((1, 1))
    check_served(spec, shape, [one, one])
    with pytest.raises(ValueError, match="outputs"):
        check_served(spec, shape, [one])
    with pytest.raises(ValueError, match="input"):
        check_served(spec, (1, *shape), [one, one])


def test_a_spec_names_its_input_volume_and_its_first_output_probability() -> None:
    good = registry.get("cxr_triage")
    assert good.serving is not None
    with pytest.raises(ValueError, match="probability"):
        replace(good, serving=replace(good.serving, outputs=(Tensor("x", (1,)), *good.serving.outputs)))
    with pytest.raises(ValueError, match="volume"):
        replace(good, serving=replace(good.serving, input=Tensor("image", (1, 256, 256))))
