"""The sixth model (tests/sixth_model: spec, input, tiny network, nothing outside that folder)
exported with the served models' own tools (models/serving.py: TorchScript, the generated
model.py, configs with the shared tail) into a repository of its own, served by a real
tritonserver through radtriage's launcher and client, and its answer made a finding, a
report and an alert."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from models import registry, serving
from models.dicom_writer import write_ct_series
from processors.fhir_report import build_result_bundle
from processors.finding import build_finding
from processors.model_inputs import prepare_input
from processors.triton_client import Inference, TritonModelClient
from radtriage.settings import REPO_ROOT
from radtriage.stack.triton import LocalTriton
from schemas.routing_rules import RoutingRules
from streams.routing import build_request, route_study
from streams.stages.escalate import alert_channel
from tests.conftest import free_port
from tests.unit.test_sixth_model import SIXTH, _ctpa_study

pytestmark = pytest.mark.integration
GRID = (1, 16, 32, 32)


@pytest.fixture(scope="module")
def sixth_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    mp = pytest.MonkeyPatch()
    mp.setenv(registry.EXTRA_SPECS_ENV, "tests.sixth_model.spec")
    registry.reload()
    from tests.sixth_model.net import PeNet
    from tests.sixth_model.spec import SPEC

    repository = tmp_path_factory.mktemp("sixth-repository")
    version = repository / SPEC.name / SPEC.version
    serving.export_torchscript(PeNet(), GRID, version)
    serving.write_triton_configs(
        version.parent,
        SPEC,
        threshold=0.5,
        version=SPEC.version,
        rule="test",
        spec_file="tests/sixth_model/spec.py",
    )
    server = LocalTriton(
        repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_file=tmp_path_factory.mktemp("sixth-triton-log") / "triton.log",
        extra_pythonpath=[REPO_ROOT],
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        mp.undo()
        registry.reload()


def test_the_sixth_model_served_by_triton_is_found_reported_and_alerted(
    sixth_triton: LocalTriton, tmp_path: Path
) -> None:
    hu = np.zeros((24, 48, 48), np.float32)
    hu[2:22, 4:44, 24:48] = 300.0
    files = write_ct_series(hu, (2.0, 1.0, 1.0), tmp_path, body_part="CHEST", series_description="CTPA")
    study = _ctpa_study(files)
    shipped = RoutingRules.load(REPO_ROOT / "deploy" / "routing" / "rules.yaml")
    rules = RoutingRules(rules=[*shipped.rules, *RoutingRules.load(SIXTH / "rules.yaml").rules])
    (route,) = route_study(study, rules)
    req = build_request(study, route)
    tensor, _volume, geometry = prepare_input(req.model_name, files)

    async def infer() -> Inference:
        client = TritonModelClient(f"127.0.0.1:{sixth_triton.grpc_port}", 30.0)
        try:
            assert await client.is_ready(req.model_name, "1")
            return await client.infer_probability(req.model_name, tensor, 1)
        finally:
            await client.close()

    result = asyncio.run(infer())
    assert result.probability == pytest.approx(1.0) and result.outputs["side_left_probability"] > 0.99
    finding = build_finding(req, result, geometry)
    assert (finding.finding, finding.positive, finding.laterality) == ("PE", True, "left")
    report = build_result_bundle(finding)["entry"][0]["resource"]
    assert report["conclusion"].startswith("Suspected pulmonary embolism, left side")
    assert alert_channel(finding, True) == "pe"
