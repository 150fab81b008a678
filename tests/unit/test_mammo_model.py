"""The committed mammo_birads: Triton configs (CPU, GPU, ONNX variants), weights, metrics, and
that the weights tell suspicious studies from normal ones and suggest a category with a side."""

from __future__ import annotations

import numpy as np
import torch

from models.mammo_birads.phantoms import mammo_study_phantom
from models.mammo_birads.writer import write_mammogram_study
from processors.birads import assess
from processors.mammogram import load_mammogram
from processors.preprocessing import MAMMO_INPUT_SHAPE, preprocess_mammogram
from tests.support.committed_model import check_configs, check_metrics_and_weights, load_weights, metrics

NAME = "mammo_birads"


def test_configs_parse_and_differ_only_in_the_instance_kind() -> None:
    cpu = check_configs(NAME, MAMMO_INPUT_SHAPE, ["probability", "birads_probabilities"], "BIRADS")
    assert list(cpu.output[1].dims) == [MAMMO_INPUT_SHAPE[0], 6]


def test_metrics() -> None:
    m = check_metrics_and_weights(NAME, MAMMO_INPUT_SHAPE)
    assert m["auc"] >= 0.85 and m["val_operating_point"]["sensitivity"] >= 0.9
    confusion = np.array(m["confusion"])
    # Rows are the true categories 0-5, every test study in exactly one cell (or unassessed).
    assert confusion.shape == (6, 6) and confusion.sum() <= m["test_size"]


def test_committed_weights_separate_fresh_studies_read_from_dicom(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = load_weights(NAME)
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
    threshold = metrics(NAME)["threshold"]
    # A flagged study's suggested category is 4 or 5, mostly in the breast the lesion is in
    # (0.84 of the test set's detected 4/5 studies).
    sides = []
    for study, prob, views in zip(studies, p, per_view.numpy(), strict=True):
        a = assess(views.astype(np.float64), threshold, bool(prob >= threshold))
        assert a is not None and (a.category in (4, 5)) == (prob >= threshold)
        if prob >= threshold and study.category >= 4:
            sides.append(a.side == study.side)
    assert len(sides) >= 3 and sum(sides) >= 2 * len(sides) / 3, sides
