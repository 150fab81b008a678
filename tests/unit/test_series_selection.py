"""Series selection and one decision per (study, rule): the pure half of issue 16's
"one study, one decision" (streams/routing.py, streams/assembly.py, streams/join.py).

The studies here are shaped like a scanner's: a scout, a 5 mm and a 0.625 mm soft-tissue
recon, a bone-kernel recon and a dose SR, arriving whole or one series at a time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from processors.fhir_report import build_result_bundle
from radtriage.settings import REPO_ROOT
from schemas.findings import Finding
from schemas.instances import InstanceEvent
from schemas.join import StudyContext
from schemas.routing_rules import RoutingRules, SeriesSelection
from schemas.studies import SeriesRef, StudyEvent
from streams import assembly
from streams.join import on_study, route_with_context
from streams.routing import RoutedSeries, decide, eligible, request_id, route_study
from tests.support.findings import ich_result

RULES = RoutingRules.load(REPO_ROOT / "deploy" / "routing" / "rules.yaml")
AXIAL = ("ORIGINAL", "PRIMARY", "AXIAL")
T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def ct(
    uid: str,
    desc: str,
    n: int,
    *,
    thickness: float | None,
    kernel: str = "H30s",
    image_type: tuple[str, ...] = AXIAL,
    number: int = 1,
    pixels: bool = True,
    body: str = "HEAD",
) -> SeriesRef:
    return SeriesRef(
        series_uid=uid,
        modality="CT" if pixels else "SR",
        body_part=body,
        series_description=desc,
        instance_uris=tuple(f"file:///b/{uid}/{i}.dcm" for i in range(n)),
        series_number=number,
        has_pixels=pixels,
        image_type=image_type,
        convolution_kernel=kernel,
        slice_thickness_mm=thickness,
        rows=512,
        columns=512,
        frames=n,
        bits_allocated=16,
    )


SCOUT = ct("1.1", "Head Topogram 0.6 T20f", 2, thickness=0.6, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
THICK = ct("1.2", "Head 5.0 H30s", 32, thickness=5.0, number=2)
THIN = ct("1.3", "Head 0.625 H30s", 240, thickness=0.625, number=3)
BONE = ct("1.4", "Head 1.25 H70h", 120, thickness=1.25, kernel="H70h", number=4)
DOSE = ct("1.5", "Dose Report", 1, thickness=None, kernel="", image_type=(), number=997, pixels=False)


def study(*series: SeriesRef, ready: datetime = T0) -> StudyEvent:
    return StudyEvent(
        study_uid="1.2.840.1",
        accession_number="ACC1",
        series=series,
        received_at=T0 - timedelta(seconds=30),
        ready_at=ready,
        ready_reason="transfer_complete",
    )


def ich_series(*series: SeriesRef) -> str | None:
    routes = [r for r in route_study(study(*series), RULES) if r.rule.model == "ich_classifier"]
    return routes[0].series.series_uid if routes else None


def test_a_whole_scanner_study_is_read_on_its_5mm_soft_tissue_series() -> None:
    assert ich_series(SCOUT, THICK, THIN, BONE, DOSE) == THICK.series_uid


@pytest.mark.parametrize(
    ("series", "expected"),
    [
        ((SCOUT,), None),  # never on a scout
        ((DOSE,), None),  # never on an object without pixels
        ((BONE,), None),  # never on a bone kernel: a normal bone series read p 0.675
        ((SCOUT, BONE, DOSE), None),
        ((THIN, BONE), THIN.series_uid),  # thin soft tissue when nothing thicker is there
        ((THICK, BONE), THICK.series_uid),  # the false alert: the bone series was larger
        ((BONE, THIN, THICK, SCOUT), THICK.series_uid),  # arrival order does not matter
    ],
)
def test_ich_series_choice(series: tuple[SeriesRef, ...], expected: str | None) -> None:
    assert ich_series(*series) == expected


def test_vendor_bone_kernels_and_reformats_are_excluded() -> None:
    for kernel in ("BONE", "BONEPLUS", "H70h", "Hr64h", "Br64", "YC", "FC35", "LUNG"):
        assert ich_series(ct("2.1", "Head 5mm", 32, thickness=5.0, kernel=kernel)) is None, kernel
    for kernel in ("STANDARD", "SOFT", "H30s", "Hr40f", "J30s", "UB", "FC21", ""):
        assert ich_series(ct("2.1", "Head 5mm", 32, thickness=5.0, kernel=kernel)) == "2.1", kernel
    derived = ("DERIVED", "SECONDARY", "AXIAL")
    assert ich_series(ct("2.2", "Head 5mm MPR", 32, thickness=5.0, image_type=derived)) is None
    assert ich_series(ct("2.3", "Head bone 5mm", 32, thickness=5.0, kernel="STANDARD")) is None


def test_thickness_outside_the_trained_range_is_not_read() -> None:
    assert ich_series(ct("3.1", "Head 10mm", 16, thickness=10.0)) is None


def test_headers_a_sender_left_empty_do_not_exclude_but_rank_last() -> None:
    bare = ct("4.1", "CT HEAD", 30, thickness=None, kernel="", image_type=())
    assert ich_series(bare) == "4.1"
    assert ich_series(bare, THICK) == THICK.series_uid


def test_equal_preference_is_decided_by_images_then_series_number_not_arrival() -> None:
    a = ct("5.1", "Head 5mm A", 32, thickness=5.0, number=7)
    b = ct("5.2", "Head 5mm B", 32, thickness=5.0, number=3)
    assert ich_series(a, b) == ich_series(b, a) == "5.2"
    c = ct("5.3", "Head 5mm C", 36, thickness=5.0, number=9)
    assert ich_series(a, b, c) == "5.3"


def test_selection_filters_are_validated() -> None:
    with pytest.raises(ValidationError, match="regular expression"):
        SeriesSelection(exclude_kernel="(bone")
    with pytest.raises(ValidationError, match="min <= max"):
        SeriesSelection(slice_thickness_mm=(5.0, 1.0))
    sel = SeriesSelection(image_type=["original"], exclude_image_type=["localizer"])
    assert sel.image_type == ["ORIGINAL"] and eligible(sel, THICK) and not eligible(sel, SCOUT)


# -- one decision per (study, rule) -----------------------------------------------------


def routed(series: SeriesRef, at: datetime = T0) -> RoutedSeries:
    return RoutedSeries(
        series_uid=series.series_uid,
        instances=len(series.instance_uris),
        request_id=request_id("1.2.840.1", "ct-head-noncontrast-ich", at),
        at=at,
    )


def ich_routes(*series: SeriesRef) -> list:  # type: ignore[type-arg]
    return [r for r in route_study(study(*series), RULES) if r.rule.model == "ich_classifier"]


def test_first_arrival_runs_every_matching_rule() -> None:
    decision = decide(ich_routes(THICK), {})
    assert decision.run == {"ct-head-noncontrast-ich": ""} and decision.unchanged == ()


def test_a_series_that_does_not_change_the_choice_reruns_nothing() -> None:
    before = {"ct-head-noncontrast-ich": routed(THICK)}
    # Per-series associations: the bone series, then the thin one, arrive after the 5 mm.
    for now in ((THICK, BONE), (THICK, BONE, THIN), (SCOUT, THICK, BONE, THIN, DOSE)):
        decision = decide(ich_routes(*now), before)
        assert decision.run == {} and decision.unchanged == ("ct-head-noncontrast-ich",)


def test_a_preferred_series_arriving_later_reruns_and_amends() -> None:
    before = {"ct-head-noncontrast-ich": routed(THIN)}
    decision = decide(ich_routes(THIN, THICK), before)
    assert decision.run == {"ct-head-noncontrast-ich": before["ct-head-noncontrast-ich"].request_id}


def test_the_same_series_grown_by_late_instances_reruns() -> None:
    partial = ct("1.2", "Head 5.0 H30s", 20, thickness=5.0, number=2)
    decision = decide(ich_routes(THICK), {"ct-head-noncontrast-ich": routed(partial)})
    assert list(decision.run) == ["ct-head-noncontrast-ich"]


def test_the_join_routes_only_the_rules_decided_and_marks_the_amendment() -> None:
    ctx = StudyContext(study=study(SCOUT, THIN, THICK), run_rules={"ct-head-noncontrast-ich": "old-id"})
    (dispatch,) = route_with_context(ctx, RULES, None, ())
    assert dispatch.request.amends_request_id == "old-id"
    assert dispatch.action == "reread_better_series"
    assert (dispatch.request.series_uid, dispatch.request.series_number) == (THICK.series_uid, 2)
    assert dispatch.request.series_description == "Head 5.0 H30s"
    assert dispatch.request.pixel_bytes == 32 * 512 * 512 * 2
    assert route_with_context(ctx.model_copy(update={"run_rules": {}}), RULES, None, ()) == []


def test_a_reread_keeps_the_other_rules_requests_for_a_late_order() -> None:
    cta = ct("9.1", "CTA head neck 0.6", 200, thickness=0.6, number=5)
    first = on_study(None, StudyContext(study=study(THIN, cta)), RULES, (), T0, 3600)
    assert set(first.state.studies["1.2.840.1"].requests) == {"ct-head-noncontrast-ich", "cta-head-neck-lvo"}
    again = StudyContext(study=study(THIN, cta, THICK), run_rules={"ct-head-noncontrast-ich": "x"})
    second = on_study(first.state, again, RULES, (), T0, 3600)
    requests = second.state.studies["1.2.840.1"].requests
    assert set(requests) == {"ct-head-noncontrast-ich", "cta-head-neck-lvo"}
    assert requests["ct-head-noncontrast-ich"].series_uid == THICK.series_uid


# -- assembly carries the headers ---------------------------------------------------------


def instance(series_uid: str, sop: str, **headers: object) -> InstanceEvent:
    return InstanceEvent(
        study_uid="1.2.840.1",
        series_uid=series_uid,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        blob_uri=f"file:///b/{sop}.dcm",
        received_at=T0,
        **headers,  # type: ignore[arg-type]
    )


def test_assembly_carries_series_headers_and_counts_frames_once() -> None:
    headers = {
        "image_type": AXIAL,
        "convolution_kernel": "H30s",
        "slice_thickness_mm": 5.0,
        "series_number": 2,
        "rows": 512,
        "columns": 512,
        "bits_allocated": 16,
    }
    state = assembly.add_instance(None, instance("1.2", "1.2.1", **headers), "")
    state = assembly.add_instance(state, instance("1.2", "1.2.2", **headers), "")
    state = assembly.add_instance(state, instance("1.2", "1.2.2", **headers), "")  # a retry
    state = assembly.add_instance(state, instance("1.5", "1.5.1", has_pixels=False, frames=0), "")
    (image, sr) = assembly.complete_study(state, "transfer_complete", now=T0).series
    assert (image.image_type, image.convolution_kernel, image.slice_thickness_mm) == (AXIAL, "H30s", 5.0)
    assert (image.series_number, image.frames, image.pixel_bytes) == (2, 2, 2 * 512 * 512 * 2)
    assert not sr.has_pixels and sr.frames == 0


# -- the report says which series and that it was amended ----------------------------------


def finding(**update: object) -> Finding:
    return ich_result(
        "1.2.840.1",
        THICK.series_uid,
        T0,
        probability=0.93,
        threshold=0.05,
        inference_ms=12.0,
        series_number=2,
        series_description="Head 5.0 H30s",
        request_id="",
        **update,
    )


def test_report_names_the_series_and_an_amendment_keeps_the_report_id() -> None:
    first = build_result_bundle(finding())
    amended = build_result_bundle(finding(amends_request_id="1.2.840.1/ct-head-noncontrast-ich/x"))
    report, observation = first["entry"][0]["resource"], first["entry"][1]["resource"]
    assert report["status"] == observation["status"] == "preliminary"
    assert 'Read on series 2 "Head 5.0 H30s"' in report["conclusion"]
    components = {c["code"]["text"]: c for c in observation["component"]}
    assert components["DICOM Series Number"]["valueInteger"] == 2
    assert components["DICOM Series Description"]["valueString"] == "Head 5.0 H30s"
    again = amended["entry"][0]["resource"]
    assert again["id"] == report["id"] and again["status"] == "amended"
    assert amended["entry"][1]["resource"]["status"] == "amended"
    assert "Amended" in again["conclusion"]
