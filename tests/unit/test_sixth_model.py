"""Issue 17, "one model, one folder": a sixth model added in the test tree only
(tests/sixth_model/: spec, input, a tiny TorchScript network, its routing rule) is routed,
inferred, reported and alerted with no change outside that folder; and the streams, the
connectors and the report builder name no model."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from models import registry
from models.dicom_writer import write_ct_series
from processors.fhir_report import FINDING_SYSTEM, SNOMED, build_result_bundle
from processors.finding import build_finding
from processors.model_inputs import prepare_input
from processors.triton_client import Inference, read_maps, read_outputs
from radtriage.kafka_acls import role_grants
from radtriage.operator.decode import topic_kinds
from radtriage.settings import REPO_ROOT, Settings
from schemas.routing_rules import RoutingRules
from schemas.studies import SeriesRef, StudyEvent
from streams.app import create_app, declare_topics
from streams.routing import build_request, route_study
from streams.stages.escalate import alert_channel, alert_of

SIXTH = REPO_ROOT / "tests" / "sixth_model"


@pytest.fixture
def sixth(monkeypatch: pytest.MonkeyPatch) -> Iterator[RoutingRules]:
    """The sixth model registered the way a deployment adds its own (RADTRIAGE_MODEL_SPECS),
    and the rules: the shipped ones plus its rule."""
    monkeypatch.setenv(registry.EXTRA_SPECS_ENV, "tests.sixth_model.spec")
    registry.reload()
    try:
        shipped = RoutingRules.load(REPO_ROOT / "deploy" / "routing" / "rules.yaml")
        yield RoutingRules(rules=[*shipped.rules, *RoutingRules.load(SIXTH / "rules.yaml").rules])
    finally:
        monkeypatch.delenv(registry.EXTRA_SPECS_ENV)
        registry.reload()


def _ctpa_study(files: list[Path]) -> StudyEvent:
    now = datetime.now(UTC)
    return StudyEvent(
        study_uid="1.2.826.0.1.3680043.10.543.6",
        accession_number="ACC6",
        patient_id="P6",
        series=(
            SeriesRef(
                series_uid="1.2.826.0.1.3680043.10.543.6.1",
                modality="CT",
                body_part="CHEST",
                series_description="CTPA",
                instance_uris=tuple(f.as_uri() for f in files),
            ),
        ),
        received_at=now,
        ready_reason="transfer_complete",
    )


def test_the_sixth_model_is_routed_inferred_reported_and_alerted(sixth: RoutingRules, tmp_path: Path) -> None:
    # A CT pulmonary angiogram whose contrast-bright vessels are on the patient's left (+x).
    hu = np.zeros((24, 48, 48), np.float32)
    hu[2:22, 4:44, 24:48] = 300.0
    files = write_ct_series(
        hu, (2.0, 1.0, 1.0), tmp_path / "ctpa", body_part="CHEST", series_description="CTPA"
    )
    study = _ctpa_study(files)

    # Routed: its rule takes the study, on the lane the rule says.
    (route,) = route_study(study, sixth)
    req = build_request(study, route)
    assert (req.model_name, req.finding, req.lane) == ("pe_detector", "PE", "stat")

    # Inferred: the spec's loader and preprocessing, then its TorchScript as Triton runs it.
    tensor, _volume, geometry = prepare_input(req.model_name, files)
    assert tensor.shape == (1, 16, 32, 32)
    from tests.sixth_model.net import torchscript

    torchscript().save(str(tmp_path / "model.pt"))
    net = torch.jit.load(str(tmp_path / "model.pt"))
    with torch.no_grad():
        probability, side_left = net(torch.from_numpy(tensor)[None])
    arrays = {"probability": probability.numpy(), "side_left_probability": side_left.numpy()}
    p, outputs = read_outputs(req.model_name, arrays)
    finding = build_finding(req, Inference(p, "1", 3.0, outputs, read_maps(arrays)), geometry)
    assert finding.finding == "PE" and finding.positive
    assert finding.laterality == "left" and finding.slice_range is finding.birads is finding.nodules is None

    # Reported: its finding code and SNOMED CT concept, its words in the conclusion.
    bundle = build_result_bundle(finding)
    report, observation, device = (e["resource"] for e in bundle["entry"])
    assert device["resourceType"] == "Device" and device["version"] == [{"value": "1"}]
    codings = observation["code"]["coding"]
    assert {"system": FINDING_SYSTEM, "code": "PE", "display": "AI triage: pulmonary embolism"} in codings
    assert {"system": SNOMED, "code": "59282003", "display": "Pulmonary embolism"} in codings
    assert report["conclusionCode"] == [{"coding": [codings[1]]}]
    assert report["conclusion"].startswith("Suspected pulmonary embolism, left side")

    # Alerted: on its own channel's topic, which the settings, the ACLs, the operator page
    # and the worker's topics (with the alert ledger's read-back) all know.
    assert alert_channel(finding, True) == "pe" and alert_channel(finding, False) is None
    alert = alert_of(finding, "k", "")
    assert (alert.finding, alert.laterality) == ("PE", "left")
    settings = Settings()
    topic = settings.topics.alert_topic("pe")
    assert topic == "triage.alerts.pe"
    assert topic in settings.topics.alert_topics() and topic in settings.topics.all()
    assert topic_kinds(settings.topics)[topic] == "alert"
    assert any(topic in str(g) for grants in role_grants(settings).values() for g in grants)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        topics = declare_topics(create_app(settings), settings)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    assert topics.alerts["pe"].get_topic_name() == topic


def test_the_sixth_model_is_gone_when_unregistered() -> None:
    assert "pe_detector" not in registry.specs()
    assert "triage.alerts.pe" not in Settings().topics.all()


def test_a_rule_cannot_contradict_its_models_spec(sixth: RoutingRules) -> None:
    (rule,) = RoutingRules.load(SIXTH / "rules.yaml").rules
    for change in ({"finding": "ICH"}, {"alert": "ich"}):
        with pytest.raises(ValueError, match=rule.model):
            RoutingRules.model_validate({"rules": [rule.model_dump() | change]})


# Where no model may be named: the pipeline's stages, the connectors, the report builder, and
# what the inference stage runs in the worker (the finding, the preprocessing pools' admission).
GENERIC = [
    REPO_ROOT / "streams",
    REPO_ROOT / "connectors",
    *(REPO_ROOT / "processors" / f for f in ("fhir_report.py", "finding.py", "preprocess_pool.py")),
]


def _names() -> re.Pattern[str]:
    words = {w for s in registry.specs().values() for w in (s.name, s.finding)}
    topics = {Settings().topics.alert_topic(c) for c in registry.alert_channels()}
    return re.compile(r"\b(" + "|".join(sorted(map(re.escape, words | topics))) + r")\b")


def test_streams_connectors_and_the_report_builder_name_no_model() -> None:
    pattern = _names()
    files = [f for p in GENERIC for f in ([p] if p.is_file() else sorted(p.rglob("*.py")))]
    assert len(files) > 20
    found = [
        f"{f.relative_to(REPO_ROOT)}:{n}: {line.strip()}"
        for f in files
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == [], "\n".join(found)
