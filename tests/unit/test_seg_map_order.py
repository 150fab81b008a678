"""The SEG's localisation map off the alert's path (streams/stages/infer_maps.py, docs/ARCHITECTURE.md
"Results to the PACS"): the finding names the map by the URI it will have, the map is
written only after, a finding already out whose map never came is owed one, and the
pacs-export stage waits a bounded time for it (streams/stages/pacs_export.arrives). And the
worker imports no highdicom unless a PACS destination is configured."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from processors.localisation import LOCALISATION_OUTPUT, PlaneField, SeriesGeometry, SliceCrop, localise
from processors.localisation_map import from_bytes, map_key
from processors.triton_client import Inference
from radtriage.blobstore import LocalBlobStore
from radtriage.settings import REPO_ROOT, DicomDestination, DispatchSettings, Settings
from schemas.requests import TriageRequest
from streams.stages.infer_maps import LocalisationMaps, localises, map_key_of
from streams.stages.pacs_export import arrives
from tests.support.findings import ich_result

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1901", "1.2.826.0.1.3680043.8.498.1901.2"
RULE = "ct-head-noncontrast-ich"
AT = datetime(2026, 12, 7, 14, 0, tzinfo=UTC)
GEOMETRY = SeriesGeometry(
    SliceCrop(0, 16, 16),
    tuple(5.0 * k for k in range(16)),
    tuple(range(1, 17)),
    PlaneField(0.0, 64.0, 0.0, 64.0),
)


def _request(model: str = "ich_classifier") -> TriageRequest:
    return TriageRequest(
        study_uid=STUDY,
        accession_number="ACC1",
        patient_id="MRN1",
        series_uid=SERIES,
        instance_uris=("file:///a.dcm",),
        lane="stat",
        rule_id=RULE,
        model_name=model,
        finding="ICH",
        threshold=0.5,
        received_at=AT,
        ready_at=AT,
        routed_at=AT,
        request_id=f"{STUDY}/{RULE}/1",
    )


def _stage(tmp_path: Path, objects: list[Any]) -> LocalisationMaps:
    """The infer stage's map steps on a real blob store; no Triton, no preprocessing pools."""
    destination = DicomDestination(name="pacs", host="h", ae_title="PACS", objects=objects)
    settings = Settings(dispatch=DispatchSettings(destinations=[destination]))
    return LocalisationMaps(settings, LocalBlobStore(tmp_path / "blobs"))


def _bleed() -> tuple[Inference, dict[str, np.ndarray]]:
    m = np.full((16, 24, 24), 0.05, dtype=np.float32)
    m[5:8, 10:14, 8:12] = 0.9
    maps = {LOCALISATION_OUTPUT: m}
    return Inference(0.9, "1", 1.0, maps=maps), maps


def test_the_finding_names_its_map_by_the_uri_it_will_have_and_nothing_is_written_before(
    tmp_path: Path,
) -> None:
    stage, req = _stage(tmp_path, ["sr", "seg"]), _request()
    result, maps = _bleed()
    built = ich_result(STUDY, SERIES, slice_range=localise(maps, GEOMETRY, True), request_id=req.request_id)
    finding, pending = stage.plan(req, built, result, GEOMETRY)
    assert pending is not None and finding.localisation_map_uri is not None
    blobs = stage.blobs
    # Deterministic: a replay and the other lane's copy of the request name the same map.
    assert pending.key == map_key(f"{STUDY}/{RULE}/1") == map_key_of(req)
    assert finding.localisation_map_uri == blobs.localisation_map_uri(STUDY, pending.key)
    # Nothing on disk until the finding is out: no thread hop, no fsync on the alert's path.
    assert not blobs.path_of(finding.localisation_map_uri).exists()
    assert stage.owed(req)  # what a kill right after publishing leaves
    asyncio.run(stage.write(req, pending))
    # Written where the published finding said, readable as the map.
    kept = from_bytes(blobs.read(finding.localisation_map_uri))
    assert kept.first <= 5 and kept.last >= 7
    assert not stage.owed(req)


def test_no_seg_wanted_no_map_and_nothing_owed(tmp_path: Path) -> None:
    stage, req = _stage(tmp_path, ["sr"]), _request()
    result, maps = _bleed()
    built = ich_result(STUDY, SERIES, slice_range=localise(maps, GEOMETRY, True))
    finding, pending = stage.plan(req, built, result, GEOMETRY)
    assert pending is None and finding.localisation_map_uri is None
    assert not stage.owed(req)


def test_a_map_being_written_by_the_other_copy_is_not_owed(tmp_path: Path) -> None:
    stage, req = _stage(tmp_path, ["sr", "seg"]), _request()
    assert stage.owed(req)
    stage.writing.add(req.request_id or "")
    assert not stage.owed(req)


def test_only_a_model_with_a_slice_range_can_owe_a_map(tmp_path: Path) -> None:
    assert localises("ich_classifier")
    assert not localises("cxr_triage") and not localises("no_such_model")
    assert not _stage(tmp_path, ["sr", "seg"]).owed(_request("cxr_triage"))


def test_the_export_waits_for_a_late_map_and_gives_up_after_its_wait(tmp_path: Path) -> None:
    late = tmp_path / "map.json"

    async def written_later() -> bool:
        async def write() -> None:
            await asyncio.sleep(0.1)
            late.write_text("{}")

        writer = asyncio.create_task(write())
        arrived = await arrives(late.is_file, wait_s=30.0)
        await writer
        return arrived

    assert asyncio.run(written_later())
    assert not asyncio.run(arrives((tmp_path / "never.json").is_file, wait_s=0.2))
    assert asyncio.run(arrives(late.is_file, wait_s=0.0))  # there already: no wait at all


@pytest.mark.parametrize("module", ["streams.agents", "streams.stages.pacs_export"])
def test_the_worker_imports_no_highdicom_or_pynetdicom_without_a_destination(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "from types import SimpleNamespace\n"
        "from radtriage.settings import Settings\n"
        "from streams.stages import pacs_export\n"
        "pacs_export.register(SimpleNamespace(settings=Settings()))\n"
        "print(sorted(m for m in ('highdicom', 'pynetdicom') if m in sys.modules))\n"
    )
    env_path = str(REPO_ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.stdout.strip() == "[]", out.stderr
