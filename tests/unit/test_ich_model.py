"""The committed ICH weights are a trained model, not a random or broken one."""

from __future__ import annotations

import json

import numpy as np
import torch

from models.phantoms import head_ct_phantom
from processors.preprocessing import ICH_INPUT_SHAPE, preprocess_head_ct
from radtriage.settings import REPO_ROOT

MODEL = REPO_ROOT / "deploy" / "triton" / "model_repository" / "ich_classifier" / "1" / "model.pt"
METRICS = json.loads((REPO_ROOT / "models" / "ich_classifier.metrics.json").read_text())


def test_recorded_validation_metrics_are_those_of_a_working_model() -> None:
    assert METRICS["val_auc"] >= 0.9
    assert METRICS["sensitivity"] >= 0.9 and METRICS["specificity"] >= 0.5
    assert METRICS["input_shape"] == list(ICH_INPUT_SHAPE)


def test_weights_separate_fresh_phantoms() -> None:
    model = torch.jit.load(str(MODEL), map_location="cpu").eval()
    rng = np.random.default_rng(777_777)  # neither the training nor the validation seed
    labels, probs = [], []
    for i in range(16):
        ph = head_ct_phantom(rng, bleed=i % 2 == 0, min_bleed_ml=2.0)
        x = torch.from_numpy(preprocess_head_ct(ph.hu, ph.spacing_zyx))[None]
        with torch.no_grad():
            probs.append(float(model(x).reshape(-1)[0]))
        labels.append(ph.has_bleed)
    predicted = [p >= METRICS["threshold"] for p in probs]
    assert sum(p == y for p, y in zip(predicted, labels, strict=True)) >= 12, list(
        zip(labels, probs, strict=True)
    )
    # A constant or random network would not rank bleeds above normals.
    pos = [p for p, y in zip(probs, labels, strict=True) if y]
    neg = [p for p, y in zip(probs, labels, strict=True) if not y]
    assert np.median(pos) > np.median(neg) + 0.2
