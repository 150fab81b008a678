from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from radtriage.settings import REPO_ROOT
from schemas.routing_rules import RoutingRules
from schemas.studies import SeriesRef, StudyEvent
from streams.routing import build_request, route_study

RULES = RoutingRules.load(REPO_ROOT / "deploy" / "routing" / "rules.yaml")


def series(uid: str, modality: str, body: str, desc: str, n: int) -> SeriesRef:
    return SeriesRef(
        series_uid=uid,
        modality=modality,
        body_part=body,
        series_description=desc,
        instance_uris=tuple(f"file:///b/{uid}/{i}.dcm" for i in range(n)),
    )


def study(*s: SeriesRef) -> StudyEvent:
    now = datetime.now(UTC)
    return StudyEvent(
        study_uid="1.2.3",
        accession_number="ACC1",
        series=s,
        received_at=now,
        ready_reason="transfer_complete",
    )


def test_noncontrast_head_ct_goes_to_ich_model_on_stat_lane() -> None:
    routes = route_study(study(series("1.1", "CT", "HEAD", "CT HEAD WO CONTRAST", 30)), RULES)
    assert [(r.rule.model, r.lane, r.series.series_uid) for r in routes] == [
        ("ich_classifier", "stat", "1.1")
    ]


def test_without_thickness_headers_the_series_with_more_images_is_chosen() -> None:
    # An event from a sender that leaves SliceThickness empty: the stated preference cannot
    # apply, so coverage decides (tests/unit/test_series_selection.py has the real shapes).
    routes = route_study(
        study(series("1.1", "CT", "HEAD", "Head 5mm", 24), series("1.2", "CT", "HEAD", "Head 1mm", 120)),
        RULES,
    )
    assert [r.series.series_uid for r in routes] == ["1.2"]


@pytest.mark.parametrize(
    ("modality", "body", "desc", "n"),
    [
        ("CT", "ABDOMEN", "CT ABDOMEN PELVIS WO CONTRAST", 60),  # a body part no model reads
        ("CT", "CHEST", "CT CHEST WO CONTRAST", 20),  # too few slices for a chest volume
        ("CT", "CHEST", "CT CHEST MIP", 120),  # a reformat, not the volume
        ("MR", "HEAD", "AX FLAIR BRAIN", 30),  # another modality
        ("CT", "HEAD", "Head perfusion", 200),  # perfusion: neither ICH nor the LVO detector
        ("CT", "HEAD", "CTA HEAD NECK", 10),  # a handful of CTA images: a MIP or reformat
        ("CT", "CHEST", "CTA CHEST PE", 300),  # an angiogram of another body part
        ("CT", "HEAD", "CT HEAD WO CONTRAST", 3),  # too few slices: a scout, not a volume
        ("CT", "", "CT HEAD WO CONTRAST", 30),  # no BodyPartExamined: not guessed
    ],
)
def test_studies_no_rule_takes_are_unrouted(modality: str, body: str, desc: str, n: int) -> None:
    assert route_study(study(series("1.1", modality, body, desc, n)), RULES) == []


@pytest.mark.parametrize("body", ["CHEST", "LUNG", "THORAX"])
def test_a_chest_ct_goes_to_the_nodule_detector_on_the_routine_lane(body: str) -> None:
    routes = route_study(study(series("1.1", "CT", body, "CT CHEST WO CONTRAST", 120)), RULES)
    assert [(r.rule.model, r.rule.finding, r.lane, r.rule.alert) for r in routes] == [
        ("nodule_detector", "NODULE", "routine", "none")
    ]


def test_body_part_and_modality_match_case_insensitively() -> None:
    assert route_study(study(series("1.1", "ct", "brain", "routine head", 30)), RULES)


def test_request_carries_rule_threshold_and_clock_starts() -> None:
    st = study(series("1.1", "CT", "HEAD", "CT HEAD", 30))
    (route,) = route_study(st, RULES)
    req = build_request(st, route)
    assert (req.model_name, req.finding, req.lane, req.rule_id) == (
        "ich_classifier",
        "ICH",
        "stat",
        "ct-head-noncontrast-ich",
    )
    assert req.threshold == route.rule.threshold
    assert req.localisation_threshold == route.rule.localisation_threshold is None  # the reference value
    assert req.received_at == st.received_at and req.ready_at == st.ready_at
    assert len(req.instance_uris) == 30


def test_a_rules_localisation_threshold_reaches_the_request_and_must_be_inside_0_1() -> None:
    from pydantic import ValidationError

    rule = RULES.rules[0].model_copy(update={"localisation_threshold": 0.6})
    st = study(series("1.1", "CT", "HEAD", "CT HEAD", 30))
    (route,) = route_study(st, RoutingRules(version=1, rules=[rule]))
    assert build_request(st, route).localisation_threshold == 0.6
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValidationError, match="localisation_threshold"):
            type(rule).model_validate({**rule.model_dump(), "localisation_threshold": bad})


def test_rules_file_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text(
        "version: 1\nrules:\n"
        "  - {id: a, match: {modality: [CT]}, model: m, finding: ICH, threshold: 0.5}\n"
        "  - {id: a, match: {modality: [CT]}, model: m, finding: ICH, threshold: 1.5}\n"
    )
    with pytest.raises(ValidationError) as err:
        RoutingRules.load(bad)
    assert "threshold" in str(err.value)
    bad.write_text(
        "version: 1\nrules:\n"
        "  - {id: a, match: {modality: [CT]}, model: m, finding: ICH, threshold: 0.5}\n"
        "  - {id: a, match: {modality: [CT]}, model: m, finding: ICH, threshold: 0.5}\n"
    )
    with pytest.raises(ValidationError, match="duplicate rule id"):
        RoutingRules.load(bad)
    bad.write_text(
        "version: 1\nrules:\n  - {id: a, match: {modality: [CT], series_description: '(unclosed'}, "
        "model: m, finding: ICH, threshold: 0.5}\n"
    )
    with pytest.raises(ValidationError):
        RoutingRules.load(bad)


@pytest.mark.parametrize(
    ("body", "desc"),
    [
        ("HEAD", "CTA HEAD NECK"),
        ("NECK", "CTA NECK"),
        ("HEADNECK", "CT Angio Head and Neck 0.6mm"),
        ("BRAIN", "cta_circle_of_willis"),
        ("head", "CT ANGIOGRAM HEAD"),
    ],
)
def test_cta_of_head_and_neck_goes_to_the_lvo_detector_on_the_stat_lane(body: str, desc: str) -> None:
    routes = route_study(study(series("1.1", "CT", body, desc, 200)), RULES)
    assert [(r.rule.model, r.rule.finding, r.rule.alert, r.lane) for r in routes] == [
        ("lvo_detector", "LVO", "stroke", "stat")
    ]
    # Time-critical like the plain head CT: an emergency patient's CTA is stat before its order.
    assert routes[0].rule.time_critical


@pytest.mark.parametrize(
    "desc",
    [
        "CTA HEAD PERFUSION",
        "CTP brain",
        "CT Perf Head 4D",
        "Angio perfusion maps",
        "CT VENOGRAM HEAD",
        "CTV head",
    ],
)
def test_perfusion_and_venography_are_not_sent_to_the_lvo_detector(desc: str) -> None:
    routes = route_study(study(series("1.1", "CT", "HEAD", desc, 200)), RULES)
    assert [r.rule.model for r in routes] == []


def test_stroke_workup_sends_plain_head_ct_to_ich_and_cta_to_lvo() -> None:
    """A code-stroke study: non-contrast head CT, CTA source images, a perfusion series."""
    routes = route_study(
        study(
            series("1.1", "CT", "HEAD", "CT HEAD WO CONTRAST", 32),
            series("1.2", "CT", "HEAD", "CTA HEAD NECK 0.625", 400),
            series("1.3", "CT", "HEAD", "CTA HEAD NECK MIP", 20),
            series("1.4", "CT", "HEAD", "CT PERFUSION HEAD", 600),
        ),
        RULES,
    )
    assert sorted((r.rule.model, r.series.series_uid) for r in routes) == [
        ("ich_classifier", "1.1"),
        ("lvo_detector", "1.2"),  # the largest CTA series, not its MIP
    ]


def test_lvo_request_carries_the_models_operating_point() -> None:
    st = study(series("1.2", "CT", "HEAD", "CTA HEAD NECK", 48))
    (route,) = route_study(st, RULES)
    req = build_request(st, route)
    metrics = json.loads((REPO_ROOT / "models" / "lvo_detector" / "metrics.json").read_text())
    assert (req.model_name, req.finding, req.rule_id) == ("lvo_detector", "LVO", "cta-head-neck-lvo")
    assert req.threshold == metrics["threshold"]
