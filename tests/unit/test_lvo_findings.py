"""The LVO detector's side: Triton outputs → laterality → Finding/Alert → FHIR report codes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from processors.fhir_report import build_result_bundle
from processors.laterality import SIDE_OUTPUT, Side, side_of
from processors.triton_client import InferenceError, read_outputs
from schemas.alerts import Alert
from schemas.base import EventDecodeError
from schemas.findings import Finding
from tests.support.findings import plain_finding

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
THRESHOLD = 0.1197


def one(v: float, dtype: Any = np.float32) -> np.ndarray:
    return np.array([[v]], dtype=dtype)  # what Triton returns for dims [1], batch 1


# -- Triton response → probability + named extra outputs ----------------------------------


def test_extra_scalar_outputs_come_back_by_name() -> None:
    p, extras = read_outputs("lvo_detector", {"probability": one(0.87), SIDE_OUTPUT: one(0.25)})
    assert p == pytest.approx(0.87)
    assert extras == {SIDE_OUTPUT: pytest.approx(0.25)}


def test_a_model_with_only_probability_has_no_extras() -> None:
    assert read_outputs("ich_classifier", {"probability": one(0.4)})[1] == {}


def test_non_scalar_and_non_numeric_outputs_are_left_out() -> None:
    arrays = {
        "probability": one(0.5),
        "clot_map": np.zeros((1, 32, 96, 96), np.float32),
        "label": np.array([[b"LVO"]], dtype=object),
        "flag": np.array([[True]]),
        "count": one(3, np.int32),
    }
    _, extras = read_outputs("m", arrays)
    assert extras == {"flag": 1.0, "count": 3.0}


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({}, "no single 'probability'"),
        ({"probability": np.zeros((1, 2), np.float32)}, "no single 'probability'"),
        ({"probability": one(1.5)}, r"probability 1\.5 outside \[0, 1\]"),
        ({"probability": one(float("nan"))}, "not a finite number"),
        ({"probability": one(0.5), SIDE_OUTPUT: one(-0.1)}, "side_left_probability .* outside"),
        ({"probability": one(0.5), SIDE_OUTPUT: one(float("inf"))}, "side_left_probability inf"),
        ({"probability": one(0.5), "logit": one(float("nan"))}, "logit nan"),
    ],
)
def test_broken_model_outputs_are_inference_errors_naming_the_output(
    arrays: dict[str, np.ndarray], fragment: str
) -> None:
    with pytest.raises(InferenceError, match=fragment):
        read_outputs("lvo_detector", arrays)


# -- side output → stated side -------------------------------------------------------------


@pytest.mark.parametrize(
    ("outputs", "positive", "side"),
    [
        ({SIDE_OUTPUT: 0.9}, True, Side("left", 0.9)),
        ({SIDE_OUTPUT: 0.2}, True, Side("right", 0.8)),
        ({SIDE_OUTPUT: 0.5}, True, Side("left", 0.5)),
        ({SIDE_OUTPUT: 0.9}, False, Side("none")),  # meaningless below the threshold
        ({}, True, Side(None)),  # a model without a side output
        ({"other": 0.9}, True, Side(None)),
    ],
)
def test_side_of(outputs: dict[str, float], positive: bool, side: Side) -> None:
    got = side_of(outputs, positive)
    assert got.laterality == side.laterality
    assert got.probability == (None if side.probability is None else pytest.approx(side.probability))


# -- Finding / Alert schema ----------------------------------------------------------------


def lvo(p: float, laterality: str | None, side_p: float | None) -> Finding:
    return plain_finding(
        "LVO",
        p,
        THRESHOLD,
        study_uid="1.2.840.99.7",
        accession_number="ACC7",
        patient_id="MRN7",
        series_uid="1.2.840.99.7.2",
        rule_id="cta-head-neck-lvo",
        inference_ms=30.0,
        laterality=laterality,
        laterality_probability=side_p,
    )


def test_finding_with_side_round_trips_and_old_findings_still_read() -> None:
    f = lvo(0.87, "left", 0.91)
    assert Finding.from_bytes(f.to_bytes()) == f
    # A finding written before the side existed (no such keys) still reads, without a side.
    old = f.model_dump(mode="json", exclude={"laterality", "laterality_probability"})
    back = Finding.model_validate(old)
    assert back.laterality is None and back.laterality_probability is None


@pytest.mark.parametrize(
    ("laterality", "side_p"),
    [("left", None), ("right", None), ("none", 0.7), (None, 0.7)],
)
def test_side_and_its_probability_come_together(laterality: str | None, side_p: float | None) -> None:
    with pytest.raises(ValueError, match="laterality_probability is given exactly when"):
        lvo(0.87, laterality, side_p)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [("laterality", "both", "laterality"), ("laterality_probability", 1.3, "laterality_probability")],
)
def test_bad_sides_on_the_wire_are_decode_errors(field: str, value: object, fragment: str) -> None:
    raw = lvo(0.87, "left", 0.91).model_dump(mode="json") | {field: value}
    with pytest.raises(EventDecodeError, match=fragment):
        Finding.from_bytes(json.dumps(raw))


def test_alert_carries_the_side() -> None:
    a = Alert(
        alert_id="1.2/LVO",
        study_uid="1.2",
        finding="LVO",
        probability=0.87,
        threshold=THRESHOLD,
        model_name="lvo_detector",
        model_version="1",
        lane="stat",
        received_at=NOW,
        ready_at=NOW,
        laterality="right",
        laterality_probability=0.8,
    )
    assert Alert.from_bytes(a.to_bytes()).laterality == "right"


# -- FHIR R4 report ------------------------------------------------------------------------


def parse(bundle: dict[str, Any]) -> tuple[DiagnosticReport, Observation]:
    Bundle.model_validate(bundle)
    return (
        DiagnosticReport.model_validate(bundle["entry"][0]["resource"]),
        Observation.model_validate(bundle["entry"][1]["resource"]),
    )


def codes(concept: Any) -> set[tuple[str, str]]:
    return {(c.system, c.code) for c in concept.coding}


@pytest.mark.parametrize(
    ("laterality", "snomed", "radlex"),
    [("left", "7771000", "RID5824"), ("right", "24028007", "RID5825")],
)
def test_positive_lvo_report_codes_the_occlusion_and_its_side(
    laterality: str, snomed: str, radlex: str
) -> None:
    report, obs = parse(build_result_bundle(lvo(0.87, laterality, 0.91)))
    occlusion = ("http://snomed.info/sct", "20059004")  # Occlusion of cerebral artery (disorder)
    assert occlusion in codes(obs.code)
    assert occlusion in codes(report.conclusionCode[0])
    assert float(obs.valueQuantity.value) == pytest.approx(0.87)
    assert obs.interpretation[0].coding[0].code == "POS"
    assert "lvo_detector version 1" in obs.method.text
    (side,) = [
        c for c in obs.component if c.code.coding and ("http://snomed.info/sct", "272741003") in codes(c.code)
    ]
    assert codes(side.valueCodeableConcept) == {
        ("http://snomed.info/sct", snomed),
        ("http://radlex.org", radlex),
    }
    (side_p,) = [
        c for c in obs.component if c.code.text == f"Probability of the {laterality} side (AI triage)"
    ]
    assert float(side_p.valueQuantity.value) == pytest.approx(0.91)
    assert report.conclusion.startswith(
        f"Suspected large-vessel occlusion, {laterality} side (probability 0.87)"
    )
    assert "0.91" in report.conclusion and "lvo_detector v1" in report.conclusion


def test_negative_lvo_report_states_no_side() -> None:
    report, obs = parse(build_result_bundle(lvo(0.05, "none", None)))
    assert report.conclusion.startswith("No large-vessel occlusion suspected")
    assert report.conclusionCode is None
    assert obs.interpretation[0].coding[0].code == "NEG"
    assert not [c for c in obs.component if c.code.coding]
    assert "side" not in report.conclusion


def test_reports_of_models_without_a_side_are_unchanged() -> None:
    f = lvo(0.87, "left", 0.91).model_copy(
        update={
            "finding": "ICH",
            "model_name": "ich_classifier",
            "laterality": None,
            "laterality_probability": None,
        }
    )
    _, obs = parse(build_result_bundle(f))
    assert [c.code.text for c in obs.component] == ["Alert threshold", "DICOM Series Instance UID"]
