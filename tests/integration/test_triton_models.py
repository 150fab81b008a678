"""lvo_detector, cxr_triage, mammo_birads and nodule_detector in a real Triton: they load, answer a
batch, and separate their phantom classes on a small fixed held-out set sent the way the lanes send
studies."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import InferenceServerClient, InferInput, InferRequestedOutput

from models.cxr_triage.phantoms import chest_radiograph_phantom
from models.cxr_triage.writer import write_radiograph
from models.dicom_writer import write_ct_series
from models.lvo_detector.phantoms import cta_phantom
from models.mammo_birads.phantoms import mammo_study_phantom
from models.mammo_birads.writer import write_mammogram_study
from models.nodule_detector.phantoms import chest_ct_phantom
from models.operating_point import auc
from processors.birads import birads_of
from processors.model_inputs import prepare_input
from processors.nodules import NoduleGeometry, nodules_of
from processors.preprocessing import CXR_INPUT_SHAPE, LVO_INPUT_SHAPE, MAMMO_INPUT_SHAPE, NODULE_INPUT_SHAPE
from processors.triton_client import Inference
from radtriage.settings import REPO_ROOT
from tests.support.triton_lanes import lane_results

pytestmark = pytest.mark.integration

# Seeds no training, validation or test set uses (those are 0, 1_000_003 and 2_000_029).
HELD_OUT_SEED = 5_150_001
CASES = 12
LVO_CASES = 20
# From each model's held-out test AUC with room for a small sample: cxr_triage 0.999 on 250
# phantoms; lvo_detector 0.949 on 200, 0.80 on its M2 occlusions, so a 20-study sample
# lands between ~0.85 and 1.
# mammo_birads: 12 studies, a third each of 4/5, 1 and 2/3, from a model whose test AUC is
# lower than the others' (models/EVALUATION.md).
# nodule_detector: 12 chest CTs, half with three nodules (one of which is then almost
# always >= 10 mm, found 0.81-0.97 of the time), from a model whose test AUC is 0.87.
MIN_AUC = {"lvo_detector": 0.85, "cxr_triage": 0.9, "mammo_birads": 0.8, "nodule_detector": 0.75}


def _metrics(model: str) -> dict:  # type: ignore[type-arg]
    return json.loads((REPO_ROOT / "models" / model / "metrics.json").read_text())


def _lvo_cases(tmp_path: Path) -> list[tuple[int, str | None, np.ndarray]]:
    rng = np.random.default_rng(HELD_OUT_SEED)
    out = []
    for i in range(LVO_CASES):
        ph = cta_phantom(rng, lvo=i % 2 == 0, side=("left", "right")[(i // 2) % 2] if i % 2 == 0 else None)
        files = write_ct_series(
            ph.hu,
            ph.spacing_zyx,
            tmp_path / f"cta{i}",
            series_description="CTA HEAD NECK",
            shuffle_files=True,
            rng=rng,
        )
        tensor = prepare_input("lvo_detector", files).tensor
        out.append((int(ph.has_lvo), ph.side, tensor))
    return out


def _cxr_cases(tmp_path: Path) -> list[tuple[int, np.ndarray]]:
    rng = np.random.default_rng(HELD_OUT_SEED)
    out = []
    for i in range(CASES):
        r = chest_radiograph_phantom(rng, pneumothorax=i % 2 == 0, min_rim_fraction=0.1)
        # DX and CR, each with both labels; CR as MONOCHROME1, as CR readers often store it.
        cr = i % 4 >= 2
        path = write_radiograph(
            r.pixels,
            r.pixel_mm,
            tmp_path / f"cxr{i}",
            modality="CR" if cr else "DX",
            photometric="MONOCHROME1" if cr else "MONOCHROME2",
        )
        tensor = prepare_input("cxr_triage", [path]).tensor
        out.append((int(r.has_pneumothorax), tensor))
    return out


def _assert_ready(url: str, model: str) -> None:
    client = InferenceServerClient(url)
    try:
        assert client.is_model_ready(model)
    finally:
        client.close()


def _batch(url: str, model: str, tensors: list[np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """One request carrying a batch (what the dynamic batcher also builds from many requests)."""
    batch = np.ascontiguousarray(np.stack(tensors), dtype=np.float32)
    inp = InferInput("volume", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    client = InferenceServerClient(url)
    try:
        result = client.infer(model, [inp], outputs=[InferRequestedOutput(o) for o in outputs], priority=1)
    finally:
        client.close()
    return {o: result.as_numpy(o) for o in outputs}


def _lane_agrees_and_separates(
    url: str, model: str, tensors: list[np.ndarray], labels: np.ndarray, served: dict[str, np.ndarray]
) -> tuple[list[Inference], np.ndarray]:
    """Every tensor through the lanes' client: each answered by version 1, the batched answers
    (`served`, of the first tensors) are the per-request ones, and the probabilities separate
    `labels` at least as MIN_AUC says. Returns the answers and their probabilities."""
    lane = asyncio.run(lane_results(url, model, tensors))
    probs = np.array([r.probability for r in lane])
    assert {r.model_version for r in lane} == {"1"}
    batched = served["probability"].reshape(-1)
    np.testing.assert_allclose(batched, probs[: len(batched)], atol=1e-4)
    assert auc(probs, labels) >= MIN_AUC[model], list(zip(labels, probs.round(3), strict=True))
    return lane, probs


def test_lvo_detector_loads_answers_a_batch_and_separates_lvo(triton_grpc_url: str, tmp_path: Path) -> None:
    client = InferenceServerClient(triton_grpc_url)
    try:
        assert client.is_model_ready("lvo_detector")
        config = client.get_model_config("lvo_detector", as_json=True)["config"]
    finally:
        client.close()
    assert [o["name"] for o in config["output"]] == ["probability", "side_left_probability"]
    assert config["dynamic_batching"]["priority_levels"] == "3"

    cases = _lvo_cases(tmp_path)
    labels = np.array([y for y, _, _ in cases])
    tensors = [t for _, _, t in cases]
    assert all(t.shape == LVO_INPUT_SHAPE for t in tensors)
    served = _batch(triton_grpc_url, "lvo_detector", tensors[:8], ["probability", "side_left_probability"])
    assert served["probability"].shape == (8, 1) and served["side_left_probability"].shape == (8, 1)
    # The lanes' client brings the model's second output back by name, unasked.
    lane = asyncio.run(lane_results(triton_grpc_url, "lvo_detector", tensors[:8]))
    assert all(set(r.outputs) == {"side_left_probability"} for r in lane)
    np.testing.assert_allclose(
        [r.outputs["side_left_probability"] for r in lane],
        served["side_left_probability"].reshape(-1),
        atol=1e-4,
    )

    # The batched answers are the per-request answers.
    _, probs = _lane_agrees_and_separates(triton_grpc_url, "lvo_detector", tensors, labels, served)
    assert ((probs >= 0) & (probs <= 1)).all()
    # Side: of the occlusions the threshold catches, most are put on the correct side.
    threshold = _metrics("lvo_detector")["threshold"]
    side = np.concatenate(
        [  # max_batch_size is 8
            _batch(triton_grpc_url, "lvo_detector", tensors[i : i + 8], ["side_left_probability"])[
                "side_left_probability"
            ]
            for i in range(0, len(tensors), 8)
        ]
    )
    called = [
        (s == "left") == (float(side[i, 0]) >= 0.5)
        for i, (y, s, _) in enumerate(cases)
        if y and probs[i] >= threshold
    ]
    # Test-set side accuracy is 0.87 on detected occlusions: two in three is the floor here.
    assert len(called) >= 4 and sum(called) >= 2 * len(called) / 3, called


def test_cxr_triage_loads_answers_a_batch_and_separates_pneumothorax(
    triton_grpc_url: str, tmp_path: Path
) -> None:
    _assert_ready(triton_grpc_url, "cxr_triage")
    cases = _cxr_cases(tmp_path)
    labels = np.array([y for y, _ in cases])
    tensors = [t for _, t in cases]
    assert all(t.shape == CXR_INPUT_SHAPE for t in tensors)
    served = _batch(triton_grpc_url, "cxr_triage", tensors[:8], ["probability"])
    assert served["probability"].shape == (8, 1)
    lane, _ = _lane_agrees_and_separates(triton_grpc_url, "cxr_triage", tensors, labels, served)
    assert all(r.outputs == {} for r in lane)  # one output: nothing extra


def _mammo_cases(tmp_path: Path) -> list[tuple[int, str | None, np.ndarray]]:
    rng = np.random.default_rng(HELD_OUT_SEED)
    out = []
    for i in range(CASES):
        category = (5, 1, 2, 4, 1, 3)[i % 6]
        study = mammo_study_phantom(rng, category=category)
        files = write_mammogram_study(study, tmp_path / f"mg{i}")
        # A PACS sends a study's images in no particular order.
        rng.shuffle(files)
        out.append((category, study.side, prepare_input("mammo_birads", files).tensor))
    return out


def test_mammo_birads_loads_answers_a_batch_and_separates_suspicious_studies(
    triton_grpc_url: str, tmp_path: Path
) -> None:
    _assert_ready(triton_grpc_url, "mammo_birads")
    cases = _mammo_cases(tmp_path)
    labels = np.array([int(c >= 4) for c, _, _ in cases])
    tensors = [t for _, _, t in cases]
    assert all(t.shape == MAMMO_INPUT_SHAPE for t in tensors)
    served = _batch(triton_grpc_url, "mammo_birads", tensors[:6], ["probability", "birads_probabilities"])
    assert served["probability"].shape == (6, 1) and served["birads_probabilities"].shape == (6, 4, 6)
    lane, _ = _lane_agrees_and_separates(triton_grpc_url, "mammo_birads", tensors, labels, served)
    # The lane client hands the per-view categories on, and they make a category that agrees
    # with the flag; flagged suspicious studies are mostly placed in the breast the lesion is
    # in (test set: 0.84; a study with both breasts at 4 has no side).
    threshold = _metrics("mammo_birads")["threshold"]
    sides = []
    for (category, side, _), r in zip(cases, lane, strict=True):
        positive = r.probability >= threshold
        b = birads_of(r.maps, threshold, positive)
        assert b is not None and (b.category in (4, 5)) == positive
        if positive and category >= 4:
            sides.append(b.side == side)
    assert len(sides) >= 3 and sum(sides) >= 2 * len(sides) / 3, sides


def _chest_cases(tmp_path: Path) -> list[tuple[list, np.ndarray, NoduleGeometry]]:  # type: ignore[type-arg]
    rng = np.random.default_rng(HELD_OUT_SEED)
    out = []
    for i in range(CASES):
        ph = chest_ct_phantom(rng, nodules=3 * (i % 2))
        files = write_ct_series(ph.hu, ph.spacing_zyx, tmp_path / f"chest{i}", body_part="CHEST")
        prepared = prepare_input("nodule_detector", files)
        assert isinstance(prepared.geometry, NoduleGeometry)
        out.append((list(ph.nodules), prepared.tensor, prepared.geometry))
    return out


def test_nodule_detector_loads_answers_a_batch_and_finds_nodules_where_they_are(
    triton_grpc_url: str, tmp_path: Path
) -> None:
    _assert_ready(triton_grpc_url, "nodule_detector")
    cases = _chest_cases(tmp_path)
    labels = np.array([int(bool(truths)) for truths, _, _ in cases])
    tensors = [t for _, t, _ in cases]
    assert all(t.shape == NODULE_INPUT_SHAPE for t in tensors)
    served = _batch(triton_grpc_url, "nodule_detector", tensors[:2], ["probability", "nodule_map"])
    assert served["probability"].shape == (2, 1)
    assert served["nodule_map"].shape == (2, 1, *NODULE_INPUT_SHAPE[1:])
    peaks = served["nodule_map"].max(axis=(1, 2, 3, 4))
    np.testing.assert_allclose(peaks, served["probability"][:, 0], atol=1e-6)
    lane, _ = _lane_agrees_and_separates(triton_grpc_url, "nodule_detector", tensors, labels, served)
    # The lane client hands the map on; the nodules read from it are real ones: every
    # flagged study with nodules has its likeliest candidate on one (centre within the
    # match rule of models/nodule_detector/train.py), in the lung it is in, about its size.
    threshold = _metrics("nodule_detector")["threshold"]
    checked = 0
    for (truths, _, geometry), r in zip(cases, lane, strict=True):
        positive = r.probability >= threshold
        nodules = nodules_of(r.maps, geometry, threshold, positive)
        assert nodules is not None and bool(nodules) == positive
        if not (positive and truths):
            continue
        top = nodules[0]
        near = [
            t
            for t in truths
            if np.linalg.norm(np.subtract(top.centre_lps_mm, t.centre_lps_mm)) <= max(5.0, t.diameter_mm / 2)
        ]
        assert near, (top, truths)
        assert top.lung == ("left" if near[0].centre_lps_mm[0] > 0 else "right")
        # Sized within 3 mm / 30 % from 10 mm up; a smaller nodule's map is fainter than its
        # partial volume, so it reads small (an 8 mm one here as 5 mm), never large.
        truth_mm = near[0].diameter_mm
        if truth_mm >= 10.0:
            assert abs(top.diameter_mm - truth_mm) <= max(3.0, 0.3 * truth_mm), (top, near)
        else:
            assert 0.0 < top.diameter_mm <= truth_mm + 1.0, (top, near)
        checked += 1
    assert checked >= 4, checked


def test_wrong_shapes_are_refused_per_request(triton_grpc_url: str) -> None:
    from tritonclient.utils import InferenceServerException

    client = InferenceServerClient(triton_grpc_url)
    try:
        for model, shape in (("lvo_detector", (1, 1, 32, 96, 96)), ("cxr_triage", (1, 1, 128, 128))):
            inp = InferInput("volume", list(shape), "FP32")
            inp.set_data_from_numpy(np.zeros(shape, np.float32))
            with pytest.raises(InferenceServerException, match=r"shape|dims"):
                client.infer(model, [inp])
        # ...and the server still answers.
        inp = InferInput("volume", [1, *CXR_INPUT_SHAPE], "FP32")
        inp.set_data_from_numpy(np.zeros((1, *CXR_INPUT_SHAPE), np.float32))
        assert client.infer("cxr_triage", [inp]).as_numpy("probability").shape == (1, 1)
    finally:
        client.close()
