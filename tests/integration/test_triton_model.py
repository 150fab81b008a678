"""The served ICH model in a real Triton: the inference path the lanes use, on fresh phantoms."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from processors.model_inputs import prepare_model_input
from processors.preprocessing import ICH_INPUT_SHAPE
from processors.triton_client import InferenceError, TritonModelClient
from radtriage.settings import REPO_ROOT

pytestmark = pytest.mark.integration

METRICS = json.loads((REPO_ROOT / "models" / "ich_classifier.metrics.json").read_text())


def test_served_model_separates_bleeds_from_normals(triton_grpc_url: str, tmp_path: Path) -> None:
    """DICOM series → volume → MONAI preprocessing → Triton, for phantoms the model never saw."""
    rng = np.random.default_rng(424242)  # not a training or validation seed
    cases = []
    for i in range(12):
        ph = head_ct_phantom(rng, bleed=i % 2 == 0, min_bleed_ml=2.0)
        files = write_ct_series(ph.hu, ph.spacing_zyx, tmp_path / str(i), shuffle_files=True, rng=rng)
        tensor, _ = prepare_model_input("ich_classifier", files)
        cases.append((ph.has_bleed, tensor))

    async def run() -> list[tuple[bool, float, str]]:
        client = TritonModelClient(triton_grpc_url, timeout_s=30)
        try:
            results = await asyncio.gather(
                *(
                    client.infer_probability("ich_classifier", t, priority=1 + i % 3)
                    for i, (_, t) in enumerate(cases)
                )
            )
        finally:
            await client.close()
        return [(label, r.probability, r.model_version) for (label, _), r in zip(cases, results, strict=True)]

    results = asyncio.run(run())
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
