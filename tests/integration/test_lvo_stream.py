"""The CTA route end to end: C-STORE → assembly → routing → lvo_detector in a real Triton →
finding with the side → FHIR report with the occlusion and laterality codes → stroke alert.

Real processes on fresh topics (`radtriage worker` and `radtriage dicom-scp`), the
session's Kafka and Triton. Three studies, written by the LVO phantom generator:
- a stroke work-up: a plain head CT (normal) and a CTA with a left-sided occlusion in one
  study; the head CT must go to the ICH model, the CTA to the LVO detector;
- a CTA with a right-sided occlusion;
- a normal CTA.
The phantoms' seeds are fixed and not among the training/validation/test seeds (0,
1_000_003, 2_000_029 and their successors); the served model's answers on them are far
from the threshold (occlusions >= 0.99 with the side >= 0.96 sure, the normal 0.05 against
0.1197), so the expectations below are the model's, not luck.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom import dcmread
from pydicom.uid import generate_uid

from models.dicom_writer import write_ct_series
from models.lvo_detector.phantoms import cta_phantom
from models.phantoms import head_ct_phantom
from radtriage.demo import send_series
from radtriage.settings import Settings
from tests.integration.harness import Worker, listener
from tests.support.kafka import Tail
from tests.support.net import free_port

pytestmark = pytest.mark.integration

SNOMED = "http://snomed.info/sct"
THRESHOLD = 0.1197  # deploy/routing/rules.yaml, cta-head-neck-lvo
LEFT_LVO_SEED, RIGHT_LVO_SEED, NORMAL_SEED = 7101, 7102, 7119


@pytest.fixture
def cta_stack(
    worker_env: tuple[dict[str, str], Settings], triton_grpc_url: str
) -> Iterator[tuple[dict[str, str], Settings]]:
    env, settings = worker_env
    port = free_port()
    env = {
        **env,
        "RADTRIAGE_TRITON__GRPC_URL": triton_grpc_url,
        "RADTRIAGE_TRITON__TIMEOUT_S": "30",
        "RADTRIAGE_DICOM__PORT": str(port),
        "RADTRIAGE_DICOM__BIND_ADDRESS": "127.0.0.1",
    }
    settings.dicom.port = port
    worker = Worker(env, settings.home)
    worker.start()
    try:
        with listener("dicom-scp", env, port, settings.home / "dicom-scp.log"):
            yield env, settings
    finally:
        worker.kill(signal.SIGTERM)


def _cta(out: Path, seed: int, *, lvo: bool, side: str | None, study_uid: str) -> list[Path]:
    ph = cta_phantom(np.random.default_rng(seed), lvo=lvo, side=side)
    return write_ct_series(
        ph.hu,
        ph.spacing_zyx,
        out,
        study_uid=study_uid,
        accession=f"CTA{seed}",
        patient_id=f"MRN-CTA{seed}",
        body_part="HEAD",
        series_description="CTA HEAD NECK",
    )


def _codes(concept: dict[str, Any]) -> set[tuple[str, str]]:
    return {(c["system"], c["code"]) for c in concept.get("coding", [])}


def _observation(result: dict[str, Any]) -> dict[str, Any]:
    Bundle.model_validate(result["bundle"])  # R4-valid as published
    return dict(result["bundle"]["entry"][1]["resource"])


def test_cta_studies_reach_the_lvo_detector_and_positive_ones_alert_with_their_side(
    cta_stack: tuple[dict[str, str], Settings], tmp_path: Path
) -> None:
    _env, settings = cta_stack
    t = settings.topics
    tail = Tail(
        settings.kafka.bootstrap_servers,
        [
            t.requests_stat,
            t.findings,
            t.results_fhir,
            t.alert_topic("stroke"),
            t.alert_topic("ich"),
            t.deadletter,
        ],
    )
    workup, right, normal = generate_uid(), generate_uid(), generate_uid()
    head = head_ct_phantom(np.random.default_rng(LEFT_LVO_SEED), bleed=False)
    head_files = write_ct_series(
        head.hu,
        head.spacing_zyx,
        tmp_path / "workup-head",
        study_uid=workup,
        accession=f"CTA{LEFT_LVO_SEED}",
        patient_id=f"MRN-CTA{LEFT_LVO_SEED}",
    )
    cta_files = _cta(tmp_path / "workup-cta", LEFT_LVO_SEED, lvo=True, side="left", study_uid=workup)
    send_series(head_files + cta_files, settings)
    send_series(_cta(tmp_path / "right", RIGHT_LVO_SEED, lvo=True, side="right", study_uid=right), settings)
    send_series(_cta(tmp_path / "normal", NORMAL_SEED, lvo=False, side=None, study_uid=normal), settings)
    cta_series = str(dcmread(cta_files[0], stop_before_pixels=True).SeriesInstanceUID)

    def reported(uid: str, finding: str) -> bool:
        return bool(tail.of(t.results_fhir, study_uid=uid, finding=finding))

    tail.until(
        lambda: (
            (
                reported(workup, "LVO")
                and reported(workup, "ICH")
                and reported(right, "LVO")
                and reported(normal, "LVO")
                and tail.of(t.alert_topic("stroke"), study_uid=workup)
                and tail.of(t.alert_topic("stroke"), study_uid=right)
            )
            or bool(tail.of(t.deadletter))
        ),
        timeout=240,
    )
    assert tail.of(t.deadletter) == []
    # A moment more: a second alert or a stray finding would show up now.
    tail.drain(2.0)

    # Routing: the work-up's head CT to ICH, its CTA (not the head CT) to the LVO detector,
    # on the stat lane (no order, no location: the rule's lane).
    requests = {(r["study_uid"], r["model_name"]): r for r in tail.of(t.requests_stat)}
    assert set(requests) == {
        (workup, "ich_classifier"),
        (workup, "lvo_detector"),
        (right, "lvo_detector"),
        (normal, "lvo_detector"),
    }
    assert requests[(workup, "lvo_detector")]["series_uid"] == cta_series
    assert requests[(workup, "lvo_detector")]["rule_id"] == "cta-head-neck-lvo"

    # Findings: the side of each occlusion, none for the normal study, none for ICH.
    findings = {(f["study_uid"], f["finding"]): f for f in tail.of(t.findings)}
    expected_sides = {workup: "left", right: "right"}
    for uid, side in expected_sides.items():
        f = findings[(uid, "LVO")]
        assert f["positive"] and f["probability"] >= THRESHOLD and f["threshold"] == THRESHOLD, f
        assert f["laterality"] == side and f["laterality_probability"] >= 0.5, f
        assert f["model_name"] == "lvo_detector" and f["model_version"] == "1"
    neg = findings[(normal, "LVO")]
    assert not neg["positive"] and neg["laterality"] == "none" and neg["laterality_probability"] is None
    ich = findings[(workup, "ICH")]
    assert ich["laterality"] is None and ich["laterality_probability"] is None

    # Reports: the occlusion's SNOMED code, and SNOMED laterality = Left/Right.
    side_codes = {"left": "7771000", "right": "24028007"}
    for uid, side in expected_sides.items():
        (result,) = tail.of(t.results_fhir, study_uid=uid, finding="LVO")
        obs = _observation(result)
        assert (SNOMED, "20059004") in _codes(obs["code"])
        (lat,) = [c for c in obs["component"] if (SNOMED, "272741003") in _codes(c["code"])]
        assert (SNOMED, side_codes[side]) in _codes(lat["valueCodeableConcept"])
        report = result["bundle"]["entry"][0]["resource"]
        assert report["conclusion"].startswith(f"Suspected large-vessel occlusion, {side} side")
        assert (SNOMED, "20059004") in _codes(report["conclusionCode"][0])
    (neg_result,) = tail.of(t.results_fhir, study_uid=normal, finding="LVO")
    neg_obs = _observation(neg_result)
    assert not [c for c in neg_obs["component"] if (SNOMED, "272741003") in _codes(c["code"])]
    assert neg_result["bundle"]["entry"][0]["resource"]["conclusion"].startswith(
        "No large-vessel occlusion suspected"
    )

    # Alerts: exactly one stroke alert per positive study, with its side; none for the
    # normal CTA, and the stroke alerts never go to the ICH topic.
    for uid, side in expected_sides.items():
        (alert,) = tail.of(t.alert_topic("stroke"), study_uid=uid)
        assert alert["finding"] == "LVO" and alert["laterality"] == side
        assert alert["laterality_probability"] == findings[(uid, "LVO")]["laterality_probability"]
        assert alert["model_name"] == "lvo_detector" and alert["lane"] == "stat"
    assert tail.of(t.alert_topic("stroke"), study_uid=normal) == []
    assert [a for a in tail.of(t.alert_topic("ich")) if a["finding"] == "LVO"] == []
