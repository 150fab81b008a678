"""Routing decisions: which series of a study goes to which model, on which lane.

Pure functions over the study event and the rules; the Faust agent in
`streams/agents.py` only feeds them and publishes what they return.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from schemas.requests import Lane, TriageRequest
from schemas.routing_rules import RoutingRules, Rule
from schemas.studies import SeriesRef, StudyEvent


@dataclass(frozen=True)
class Route:
    rule: Rule
    series: SeriesRef
    lane: Lane


def series_matches(rule: Rule, series: SeriesRef) -> bool:
    m = rule.match
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
    return len(series.instance_uris) >= m.min_instances


def route_study(study: StudyEvent, rules: RoutingRules) -> list[Route]:
    """One route per matching rule; when several series match a rule, the largest is used.

    The largest series is the thin-slice reconstruction the models were built for;
    sending every matching series would run the same model several times per study.
    """
    routes: list[Route] = []
    for rule in rules.rules:
        candidates = [s for s in study.series if series_matches(rule, s)]
        if candidates:
            best = max(candidates, key=lambda s: len(s.instance_uris))
            routes.append(Route(rule=rule, series=best, lane=rule.lane))
    return routes


def build_request(study: StudyEvent, route: Route) -> TriageRequest:
    return TriageRequest(
        study_uid=study.study_uid,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        series_uid=route.series.series_uid,
        instance_uris=route.series.instance_uris,
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
