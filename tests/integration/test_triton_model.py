"""The served ICH model in a real Triton: the inference path the lanes use, on fresh phantoms."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from processors.model_inputs import prepare_input
from processors.preprocessing import ICH_INPUT_SHAPE
from processors.triton_client import InferenceError, TritonModelClient
from radtriage.settings import REPO_ROOT
from tests.support.triton_lanes import lane_results

pytestmark = pytest.mark.integration

METRICS = json.loads((REPO_ROOT / "models" / "ich_classifier" / "metrics.json").read_text())


def test_served_model_separates_bleeds_from_normals(triton_grpc_url: str, tmp_path: Path) -> None:
    """DICOM series → volume → MONAI preprocessing → Triton, for phantoms the model never saw."""
    rng = np.random.default_rng(424242)  # not a training or validation seed
    cases = []
    for i in range(12):
        ph = head_ct_phantom(rng, bleed=i % 2 == 0, min_bleed_ml=2.0)
        files = write_ct_series(ph.hu, ph.spacing_zyx, tmp_path / str(i), shuffle_files=True, rng=rng)
        tensor = prepare_input("ich_classifier", files).tensor
        cases.append((ph.has_bleed, tensor))

    inferred = asyncio.run(
        lane_results(triton_grpc_url, "ich_classifier", [t for _, t in cases], timeout_s=30)
    )
    results = [(label, r.probability, r.model_version) for (label, _), r in zip(cases, inferred, strict=True)]
    threshold = METRICS["threshold"]
    correct = sum((p >= threshold) == label for label, p, _ in results)
    assert correct >= 10, results  # the validation set says ~AUC 0.99; 10/12 leaves room for noise
    assert {v for _, _, v in results} == {"1"}
    # Probabilities, not logits.
    assert all(0.0 <= p <= 1.0 for _, p, _ in results)


def test_wrong_input_is_an_error_not_a_crash(triton_grpc_url: str) -> None:
    async def run() -> None:
        client = TritonModelClient(triton_grpc_url, timeout_s=10)
        try:
            with pytest.raises(InferenceError, match="shape"):
                await client.infer_probability("ich_classifier", np.zeros((1, 4, 4, 4), np.float32), 1)
            with pytest.raises(InferenceError, match="NaN"):
                await client.infer_probability(
                    "ich_classifier", np.full(ICH_INPUT_SHAPE, np.nan, np.float32), 1
                )
            with pytest.raises(InferenceError):
                await client.infer_probability("no_such_model", np.zeros(ICH_INPUT_SHAPE, np.float32), 1)
            # ...and the server still answers.
            ok = await client.infer_probability("ich_classifier", np.zeros(ICH_INPUT_SHAPE, np.float32), 1)
            assert 0.0 <= ok.probability <= 1.0
        finally:
            await client.close()

    asyncio.run(run())


def test_served_model_localises_the_bleed_to_its_slices(triton_grpc_url: str, tmp_path: Path) -> None:
    """The second output, `localisation_map`, reaches the client beside `probability`, and
    processors/localisation.py turns it into a slice range on the series' own instance
    numbers that covers slices with blood."""
    from pydicom import dcmread

    from processors.localisation import LOCALISATION_OUTPUT, localise

    rng = np.random.default_rng(434343)  # not a training, validation or test seed
    cases = []
    for i in range(6):
        ph = head_ct_phantom(rng, bleed=True, min_bleed_ml=1.0)
        assert ph.blood_mask is not None
        files = write_ct_series(ph.hu, ph.spacing_zyx, tmp_path / str(i), shuffle_files=True, rng=rng)
        tensor, _volume, geometry = prepare_input("ich_classifier", files)
        z_by_number = {
            int(ds.InstanceNumber): float(ds.ImagePositionPatient[2]) for ds in map(dcmread, files)
        }
        ordered = sorted(z_by_number.values())
        blood_z = {ordered[k] for k in np.flatnonzero(ph.blood_mask.any(axis=(1, 2)))}
        cases.append((tensor, geometry, z_by_number, blood_z))

    tensors = [t for t, *_ in cases]
    results = asyncio.run(
        lane_results(triton_grpc_url, "ich_classifier", tensors, priorities=[1] * len(tensors), timeout_s=30)
    )
    hits = 0
    for result, (_t, geometry, z_by_number, blood_z) in zip(results, cases, strict=True):
        assert result.maps[LOCALISATION_OUTPUT].shape == (16, 24, 24)
        assert "localisation_map" not in result.outputs  # not mistaken for a scalar output
        r = localise(result.maps, geometry, positive=True)
        assert r is not None and r.first_instance_number is not None and r.last_instance_number is not None
        assert z_by_number[r.first_instance_number] == pytest.approx(r.first_position_mm, abs=1e-3)
        assert z_by_number[r.last_instance_number] == pytest.approx(r.last_position_mm, abs=1e-3)
        covered = {
            z for z in z_by_number.values() if r.first_position_mm - 1e-3 <= z <= r.last_position_mm + 1e-3
        }
        hits += bool(covered & blood_z)
    assert hits >= 5, hits


def test_a_rule_pinned_version_is_served_and_an_absent_one_is_refused_and_shown_down(
    triton_grpc_url: str, tmp_path: Path
) -> None:
    """The routing rules name model and version: the named version answers; a version Triton
    does not serve is an InferenceError naming it (the lane dead-letters with it), and
    `radtriage status` and /metrics show that model down."""
    import yaml

    from radtriage.metrics import ModelReadyCollector
    from radtriage.settings import Settings
    from radtriage.status import read_models

    async def run() -> None:
        client = TritonModelClient(triton_grpc_url, timeout_s=10)
        try:
            volume = np.zeros(ICH_INPUT_SHAPE, np.float32)
            pinned = await client.infer_probability("ich_classifier", volume, 1, model_version="1")
            assert pinned.model_version == "1"
            with pytest.raises(InferenceError, match="ich_classifier version 7"):
                await client.infer_probability("ich_classifier", volume, 1, model_version="7")
            assert await client.is_ready("ich_classifier", "1")
            assert not await client.is_ready("ich_classifier", "7")
        finally:
            await client.close()

    asyncio.run(run())

    rules = yaml.safe_load((REPO_ROOT / "deploy" / "routing" / "rules.yaml").read_text())
    for rule in rules["rules"]:
        if rule["model"] == "ich_classifier":
            rule["model_version"] = "7"
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules))
    settings = Settings()
    settings.triton.grpc_url = triton_grpc_url
    settings.routing_rules = rules_file
    status = {m.name: m for m in read_models(settings, timeout_s=10)}
    assert not status["ich_classifier"].up and "version 7" in status["ich_classifier"].detail
    assert status["lvo_detector"].up
    ready = ModelReadyCollector(settings, [("ich_classifier", "7"), ("lvo_detector", "1")])._read()
    assert ready == {"ich_classifier": False, "lvo_detector": True}


def test_every_routed_model_warms_and_an_unknown_one_is_an_error(triton_grpc_url: str) -> None:
    """What a worker does before it says ready (streams/agents.py `warm`): one inference per
    routed model on zeros of the shape Triton declares for it."""
    from schemas.routing_rules import RoutingRules

    rules = RoutingRules.load(REPO_ROOT / "deploy" / "routing" / "rules.yaml")

    async def run() -> dict[str, float]:
        client = TritonModelClient(triton_grpc_url, timeout_s=30)
        try:
            warmed = {r.model: await client.warm(r.model, r.model_version) for r in rules.rules}
            with pytest.raises(InferenceError, match="no_such_model"):
                await client.warm("no_such_model")
            return warmed
        finally:
            await client.close()

    warmed = asyncio.run(run())
    assert set(warmed) == {r.model for r in rules.rules}
    assert all(ms > 0 for ms in warmed.values()), warmed
