"""Every recipe (models/<name>/train.py) runs end to end on the one training engine
(models/training.py): a smoke run of one epoch on a few phantoms writes the weights, both
Triton configs, the ONNX variant and a metrics file with the keys every recipe shares. Not a
training run: the numbers mean nothing at this size."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from models import training
from models.serving import parse_config

SMOKE = ["--epochs", "1", "--threads", "1"]
TINY = ["--train", "2", "--batch", "2", "--val", "4", "--test", "4"]
RECIPES = {
    "ich_classifier": TINY,
    "lvo_detector": [*TINY, "--workers", "1"],
    "cxr_triage": [*TINY, "--workers", "1"],
    # Studies of categories 0-5 in turn: six hold a suspicious (4, 5) one to choose a threshold on.
    "mammo_birads": ["--train", "6", "--batch", "6", "--val", "6", "--test", "6", "--workers", "1"],
    "nodule_detector": [*TINY, "--steps", "1", "--workers", "1"],
}
SHARED_KEYS = {
    "model", "version", "finding", "threshold", "threshold_rule", "auc", "sensitivity", "specificity",
    "val_auc", "val_operating_point", "train_size", "epochs", "history", "training_seconds",
    "input_shape", "parameters", "weights_file", "weights_bytes", "note",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipe_runs_on_the_engine(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "MIN_TEST", 4)
    recipe = importlib.import_module(f"models.{name}.train")
    out, metrics_file = tmp_path / name / "1", tmp_path / "metrics.json"
    recipe.main(["--out", str(out), "--metrics", str(metrics_file), *SMOKE, *RECIPES[name]])
    metrics = json.loads(metrics_file.read_text())
    assert SHARED_KEYS <= set(metrics)
    assert (metrics["model"], metrics["finding"], len(metrics["history"])) == (name, recipe.SPEC.finding, 1)
    assert (out / "model.pt").stat().st_size == metrics["weights_bytes"]
    assert (out / "model.py").is_file() and (out / "model.onnx").is_file()
    for config in ("config.pbtxt", "configs/gpu.pbtxt", "configs/onnx.pbtxt"):
        assert parse_config((out.parent / config).read_text()).name == name
