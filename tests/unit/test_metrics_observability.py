"""deploy/observability: the Prometheus rules and the Grafana dashboard use only metrics /metrics exposes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import yaml
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from radtriage import metrics
from radtriage.settings import REPO_ROOT

OBSERVABILITY = REPO_ROOT / "deploy" / "observability"
METRIC_NAME = re.compile(r"\b(radtriage_[a-z0-9_]+)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def exposed_sample_names() -> set[str]:
    """Sample names of this process's /metrics text (families with no samples yet count, with
    the suffixes their type gives them), plus what the scrape-time collectors expose."""
    names: set[str] = set()
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        if family.name.startswith("radtriage_"):
            names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names | set(metrics.SCRAPE_TIME_METRICS)


def used_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def _rules() -> dict[str, Any]:
    return yaml.safe_load((OBSERVABILITY / "prometheus-rules.yaml").read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    return data


def _balanced(expr: str) -> bool:
    depth = {"(": 0, "[": 0, "{": 0}
    closing = {")": "(", "]": "[", "}": "{"}
    for ch in re.sub(r'"[^"]*"', '""', expr):
        if ch in depth:
            depth[ch] += 1
        elif ch in closing:
            depth[closing[ch]] -= 1
            if depth[closing[ch]] < 0:
                return False
    return all(v == 0 for v in depth.values())


def test_exposed_names_include_every_kind() -> None:
    names = exposed_sample_names()
    assert "radtriage_ready_to_alert_seconds_bucket" in names
    assert "radtriage_dead_letters_total" in names
    assert "radtriage_requests_in_flight" in names
    assert "radtriage_consumer_lag" in names


def test_rules_have_the_prometheus_rule_group_structure() -> None:
    data = _rules()
    assert set(data) == {"groups"} and isinstance(data["groups"], list) and data["groups"]
    group_names = [g["name"] for g in data["groups"]]
    assert len(group_names) == len(set(group_names))
    for group in data["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        assert "interval" not in group or DURATION.match(group["interval"])
        assert isinstance(group["rules"], list) and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= RULE_KEYS, rule
            assert ("alert" in rule) != ("record" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert _balanced(rule["expr"]), rule["expr"]
            if "record" in rule:
                # Recording rule names follow level:metric:operations.
                assert re.match(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$", rule["record"]) and ":" in rule["record"]
                assert not ({"for", "annotations"} & set(rule))
            else:
                assert re.match(r"^[A-Za-z][A-Za-z0-9]*$", rule["alert"])
                assert "for" not in rule or DURATION.match(rule["for"])
                assert rule["labels"]["severity"] in {"critical", "warning"}
                assert rule["annotations"]["summary"]
                for value in [*rule["labels"].values(), *rule["annotations"].values()]:
                    assert isinstance(value, str)


def test_rules_cover_what_operators_asked_for() -> None:
    alerts = {r["alert"]: r["expr"] for g in _rules()["groups"] for r in g["rules"] if "alert" in r}
    stat_latency = alerts["RadtriageStatReadyToAlertSlow"]
    assert "radtriage_ready_to_alert_seconds_bucket" in stat_latency and 'lane="stat"' in stat_latency
    assert "> 5" in stat_latency  # the objective is a bucket edge (test_metrics.py)
    assert "radtriage_dead_letters_total" in alerts["RadtriageDeadLettersRising"]
    assert "deriv(radtriage_consumer_lag" in alerts["RadtriageConsumerLagGrowing"]
    assert "radtriage_model_ready == 0" in alerts["RadtriageModelDown"]
    no_alerts = alerts["RadtriageNoAlertsWhileStudiesFlow"]
    assert "radtriage_studies_assembled_total" in no_alerts and "radtriage_alerts_total" in no_alerts


def test_every_metric_the_rules_use_is_exposed() -> None:
    exposed = exposed_sample_names()
    used: set[str] = set()
    for group in _rules()["groups"]:
        for rule in group["rules"]:
            used |= used_names(rule["expr"])
    assert used, "no metric names found in the rules"
    assert used <= exposed, sorted(used - exposed)


def test_every_metric_the_dashboard_uses_is_exposed() -> None:
    dashboard = _dashboard()
    exposed = exposed_sample_names()
    used: set[str] = set()
    for panel in _panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["type"] == "prometheus"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert _balanced(target["expr"]), target["expr"]
            used |= used_names(target["expr"])
    assert used <= exposed, sorted(used - exposed)
    # The dashboard shows every latency histogram and every scrape-time gauge.
    histograms = {n.removesuffix("_bucket") for n in exposed if n.endswith("_bucket")}
    assert histograms <= {n.removesuffix("_bucket") for n in used}, sorted(
        histograms - {n.removesuffix("_bucket") for n in used}
    )
    assert set(metrics.SCRAPE_TIME_METRICS) <= used


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
