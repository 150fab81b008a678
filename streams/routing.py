"""Routing decisions: which series of a study goes to which model, on which lane.

Pure functions over the study event and the rules; the Faust agent in
`streams/agents.py` only feeds them and publishes what they return.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict

from schemas.requests import Lane, TriageRequest
from schemas.routing_rules import RoutingRules, Rule, SeriesSelection
from schemas.studies import SeriesRef, StudyEvent


@dataclass(frozen=True)
class Route:
    rule: Rule
    series: SeriesRef
    lane: Lane


def series_matches(rule: Rule, series: SeriesRef) -> bool:
    m = rule.match
    if not series.has_pixels:
        return False  # a dose SR, a KOS, a PDF: kept with the study, never read by a model
    if series.modality.upper() not in {x.upper() for x in m.modality}:
        return False
    if m.body_part and series.body_part.upper() not in {x.upper() for x in m.body_part}:
        return False
    if m.series_description and not re.search(m.series_description, series.series_description, re.I):
        return False
    if m.exclude_series_description and re.search(
        m.exclude_series_description, series.series_description, re.I
    ):
        return False
    if len(series.instance_uris) < m.min_instances:
        return False
    return eligible(m.series, series)


def eligible(sel: SeriesSelection, series: SeriesRef) -> bool:
    """The rule's series filters (schemas/routing_rules.SeriesSelection)."""
    image_type = {v.upper() for v in series.image_type}
    if image_type & set(sel.exclude_image_type):
        return False
    if image_type and not set(sel.image_type) <= image_type:
        return False
    if (
        sel.exclude_kernel
        and series.convolution_kernel
        and re.search(sel.exclude_kernel, series.convolution_kernel, re.I)
    ):
        return False
    thickness = series.slice_thickness_mm
    if sel.slice_thickness_mm is not None and thickness is not None:
        low, high = sel.slice_thickness_mm
        if not low <= thickness <= high:
            return False
    return True


def preference(sel: SeriesSelection, series: SeriesRef) -> tuple[float, int, int, str]:
    """Smaller is preferred: nearest the preferred thickness (unknown last), more images,
    lower series number, then the UID so the choice never depends on arrival order."""
    thickness = series.slice_thickness_mm
    if sel.prefer_slice_thickness_mm is None:
        distance = 0.0
    elif thickness is None:
        distance = math.inf
    else:
        distance = round(abs(thickness - sel.prefer_slice_thickness_mm), 3)
    number = series.series_number if series.series_number is not None else 1 << 31
    return (distance, -len(series.instance_uris), number, series.series_uid)


def route_study(study: StudyEvent, rules: RoutingRules) -> list[Route]:
    """One route per matching rule, on the series the rule prefers among those it may read.

    Sending every matching series would run the same model several times per study; the
    rule's SeriesSelection says which one its model was built for.
    """
    routes: list[Route] = []
    for rule in rules.rules:
        candidates = [s for s in study.series if series_matches(rule, s)]
        if candidates:
            best = min(candidates, key=lambda s: preference(rule.match.series, s))
            routes.append(Route(rule=rule, series=best, lane=rule.lane))
    return routes


class RoutedSeries(BaseModel):
    """What a rule last read of a study (the route stage's table, keyed by study UID)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    series_uid: str
    instances: int
    request_id: str
    at: datetime


@dataclass(frozen=True)
class Decision:
    """One study event's routing, against what was already read of the study."""

    # Rules to run now, each with the request id its finding amends ("" for a first read).
    run: dict[str, str]
    # Rules whose series is the one already read (nothing to do: no second report).
    unchanged: tuple[str, ...]


def decide(routes: list[Route], previous: Mapping[str, RoutedSeries]) -> Decision:
    """One study, one decision per (study, rule), whatever the series and associations.

    A study arrives again whenever an association ends (scanners send one per series):
    a rule runs again only when its preferred series is now another one, or the same
    series has grown (instances that arrived after it was first read); it then amends
    the earlier finding. The same series again changes nothing.
    """
    run: dict[str, str] = {}
    unchanged: list[str] = []
    for route in routes:
        before = previous.get(route.rule.id)
        if before is None:
            run[route.rule.id] = ""
        elif before.series_uid == route.series.series_uid and before.instances >= len(
            route.series.instance_uris
        ):
            unchanged.append(route.rule.id)
        else:
            run[route.rule.id] = before.request_id
    return Decision(run=run, unchanged=tuple(unchanged))


def request_id(study_uid: str, rule_id: str, ready_at: datetime) -> str:
    """A routing decision's identity: a re-sent study (new ready time) is new work, an
    upgraded copy of the same decision is not."""
    return f"{study_uid}/{rule_id}/{ready_at.astimezone(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}"


def build_request(study: StudyEvent, route: Route) -> TriageRequest:
    return TriageRequest(
        study_uid=study.study_uid,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        series_uid=route.series.series_uid,
        series_number=route.series.series_number,
        series_description=route.series.series_description,
        instance_uris=route.series.instance_uris,
        pixel_bytes=route.series.pixel_bytes,
        lane=route.lane,
        rule_id=route.rule.id,
        model_name=route.rule.model,
        model_version=route.rule.model_version,
        finding=route.rule.finding,
        threshold=route.rule.threshold,
        localisation_threshold=route.rule.localisation_threshold,
        received_at=study.received_at,
        ready_at=study.ready_at,
    )
