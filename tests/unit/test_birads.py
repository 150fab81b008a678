"""The BI-RADS category of a mammography finding: per-view outputs to the suggested category,
the finding's consistency rule, and its FHIR coding."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from processors.birads import BIRADS_OUTPUT, CONCERN_ORDER, VIEWS, assess, birads_of, overall_category
from processors.fhir_report import BIRADS_CATEGORIES, build_result_bundle, conclusion_text
from schemas.findings import BiradsAssessment, Finding
from tests.support.findings import plain_finding

THRESHOLD = 0.3


def _views(**rows: list[float]) -> np.ndarray:
    """(4, 6) per-view probabilities; views not named are absent (zeros)."""
    out = np.zeros((len(VIEWS), 6))
    for name, p in rows.items():
        out[VIEWS.index(name)] = p
    return out


NEGATIVE = [0.02, 0.9, 0.04, 0.02, 0.01, 0.01]
BENIGN = [0.02, 0.1, 0.8, 0.06, 0.01, 0.01]
PROBABLY_BENIGN = [0.02, 0.1, 0.1, 0.7, 0.05, 0.03]
INCOMPLETE = [0.85, 0.1, 0.02, 0.01, 0.01, 0.01]
SUSPICIOUS = [0.01, 0.05, 0.05, 0.09, 0.6, 0.2]
MALIGNANT = [0.01, 0.02, 0.02, 0.05, 0.2, 0.7]


@pytest.mark.parametrize(
    ("categories", "overall"),
    [([1, 0, 4], 4), ([2, 0], 0), ([3, 2, 1], 3), ([1, 1], 1), ([5, 4, 0], 5), ([6, 3], 6), ([6, 0], 0)],
)
def test_categories_combine_by_the_acr_hierarchy(categories: list[int], overall: int) -> None:
    assert overall_category(categories) == overall
    assert CONCERN_ORDER == (1, 2, 3, 6, 0, 4, 5)


def test_a_suspicious_view_sets_the_category_side_and_breasts() -> None:
    per_view = _views(RCC=NEGATIVE, RMLO=NEGATIVE, LCC=SUSPICIOUS, LMLO=MALIGNANT)
    a = assess(per_view, THRESHOLD, positive=True)
    assert a is not None
    assert a.category == 5 and a.side == "left" and a.views == ("LMLO",)
    assert a.left_category == 5 and a.right_category == 1
    assert a.probability == pytest.approx(0.7)


def test_below_the_threshold_no_view_is_suspicious_whatever_its_argmax() -> None:
    # P(4)+P(5) = 0.8 would be suspicious at 0.3, but the finding is negative: the flag wins.
    per_view = _views(RCC=SUSPICIOUS, LCC=BENIGN)
    a = assess(per_view, THRESHOLD, positive=False)
    assert a is not None and a.category not in (4, 5)


def test_a_positive_finding_gets_4_or_5_even_a_rounding_step_under_the_threshold() -> None:
    # Served probability (float32) reached the threshold; the float64 sum is a hair under it.
    p = [0.5, 0.2, 0.0, 0.0, 0.2999999, 0.0000001 - 1e-9]
    a = assess(_views(RCC=p), THRESHOLD, positive=True)
    assert a is not None and a.category == 4


def test_incomplete_outranks_benign_but_not_suspicious() -> None:
    a = assess(_views(RCC=INCOMPLETE, LCC=PROBABLY_BENIGN), THRESHOLD, positive=False)
    assert a is not None and a.category == 0 and a.side == "right"
    b = assess(_views(RCC=INCOMPLETE, LCC=SUSPICIOUS), THRESHOLD, positive=True)
    assert b is not None and b.category == 4 and b.side == "left"


def test_a_negative_study_has_no_side_and_absent_views_are_not_read() -> None:
    a = assess(_views(LCC=NEGATIVE, LMLO=NEGATIVE), THRESHOLD, positive=False)
    assert a is not None and a.category == 1 and a.side is None
    assert a.right_category is None and a.left_category == 1
    assert assess(_views(), THRESHOLD, positive=False) is None


def test_malformed_outputs_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="4 x 6"):
        assess(np.zeros((4, 5)), THRESHOLD, positive=False)
    bad = _views(RCC=NEGATIVE)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="probabilities"):
        assess(bad, THRESHOLD, positive=False)
    assert birads_of({}, THRESHOLD, positive=False) is None  # other models: no category
    assert birads_of({BIRADS_OUTPUT: _views(RCC=BENIGN)}, THRESHOLD, positive=False) is not None


def _finding(birads: BiradsAssessment | None, positive: bool) -> Finding:
    """A mammogram's finding as the routine lane publishes it, positive or not, with `birads`."""
    p = 0.8 if positive else 0.1
    return plain_finding("BIRADS", p, THRESHOLD, lane="routine", rule_id="mg-breast-birads", birads=birads)


def test_a_finding_whose_category_contradicts_its_flag_is_refused() -> None:
    with pytest.raises(ValidationError, match="contradicts"):
        _finding(BiradsAssessment(category=4, probability=0.6, side="left"), positive=False)
    with pytest.raises(ValidationError, match="contradicts"):
        _finding(BiradsAssessment(category=2, probability=0.6), positive=True)
    with pytest.raises(ValidationError):
        BiradsAssessment(category=7, probability=0.5)  # type: ignore[arg-type]


def test_the_report_codes_the_category_in_snomed_and_names_breast_and_view() -> None:
    a = assess(_views(RCC=NEGATIVE, RMLO=NEGATIVE, LCC=SUSPICIOUS, LMLO=SUSPICIOUS), THRESHOLD, positive=True)
    bundle = build_result_bundle(_finding(a, positive=True))
    report, observation, _device = (e["resource"] for e in bundle["entry"])
    assert report["conclusionCode"][0]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "397144001",
        "display": BIRADS_CATEGORIES[4][2],
    }
    assert "Suggested BI-RADS 4 (suspicious), left breast" in report["conclusion"]
    # The probability's own code is radtriage's (no SNOMED CT concept for "BI-RADS 4 or 5").
    assert [c["system"] for c in observation["code"]["coding"]] == [
        "https://radtriage.dev/fhir/CodeSystem/ai-finding"
    ]
    components = {c["code"]["text"]: c for c in observation["component"]}
    overall = components["BI-RADS assessment category (AI suggestion)"]["valueCodeableConcept"]
    assert overall["coding"][0]["code"] == "397144001" and overall["text"] == "BI-RADS 4: suspicious"
    right = components["BI-RADS assessment category, right breast"]["valueCodeableConcept"]
    assert right["coding"][0]["code"] == "397140005"
    assert components["Laterality"]["valueCodeableConcept"]["coding"][0]["code"] == "7771000"


def test_a_negative_mammogram_still_concludes_with_its_category() -> None:
    a = assess(_views(RCC=NEGATIVE, LCC=BENIGN), THRESHOLD, positive=False)
    finding = _finding(a, positive=False)
    report = build_result_bundle(finding)["entry"][0]["resource"]
    assert report["conclusionCode"][0]["coding"][0]["code"] == "397141009"
    assert "Suggested BI-RADS 2 (benign)" in conclusion_text(finding)
    assert all(BIRADS_CATEGORIES[c][1].isdigit() for c in range(7))
