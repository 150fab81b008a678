"""The SEG's localisation map is written after its finding is published (streams/stages/infer.py,
docs/ARCHITECTURE.md "Results to the PACS"): a worker killed between the two must not leave
the finding naming a map that never comes. The worker dies right after Kafka acknowledged
the finding (fault injection `crash_after_finding`: before the map is written, before the
request's offset is committed); the next worker takes the request again, finds the finding
already out and the map absent, runs the model for the map alone and writes it where the
finding says (`map_restored` on triage.audit). Real Kafka, real Triton, real workers."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from processors.localisation_map import from_bytes
from radtriage.settings import Settings
from tests.integration.harness import Studies, Worker
from tests.support.kafka import Tail

pytestmark = pytest.mark.integration

# A destination that wants SEGs (so the infer stage keeps maps) but none of this test's
# findings: nothing is sent, no PACS is needed.
SEG_FOR_LVO_ONLY = json.dumps(
    [{"name": "pacs", "host": "127.0.0.1", "ae_title": "PACS", "findings": ["LVO"], "objects": ["sr", "seg"]}]
)


def test_a_map_lost_to_a_kill_after_the_finding_is_restored_by_the_next_worker(
    worker_env: tuple[dict[str, str], Settings], triton_grpc_url: str
) -> None:
    env, settings = worker_env
    t = settings.topics
    env = {
        **env,
        "RADTRIAGE_TRITON__GRPC_URL": triton_grpc_url,
        "RADTRIAGE_TRITON__TIMEOUT_S": "20",
        "RADTRIAGE_DISPATCH__DESTINATIONS": SEG_FOR_LVO_ONLY,
    }
    crashing = Worker({**env, "RADTRIAGE_STREAMS__FAULT_INJECTION": "crash_after_finding"}, settings.home)
    crashing.start()
    tail = Tail(settings.kafka.bootstrap_servers, [t.findings, t.audit])
    studies = Studies(settings, settings.home)
    uid = studies.send("stat", bleed=True)
    tail.until(lambda: len(tail.of(t.findings, study_uid=uid)) == 1, timeout=180)
    assert crashing.proc is not None
    assert crashing.proc.wait(60) == 70  # died after the finding, before its map
    (finding,) = tail.of(t.findings, study_uid=uid)
    assert finding["positive"] and finding["localisation_map_uri"]
    map_file = Path(unquote(urlparse(finding["localisation_map_uri"]).path))
    assert not map_file.exists()  # the finding went out first; the map never came

    survivor = Worker(env, settings.home)
    survivor.start()
    tail.until(
        lambda: any(a["decision"] == "map_restored" for a in tail.of(t.audit, study_uid=uid)), timeout=180
    )
    (restored,) = [a for a in tail.of(t.audit, study_uid=uid) if a["decision"] == "map_restored"]
    assert restored["detail"]["map_uri"] == finding["localisation_map_uri"]
    kept = from_bytes(map_file.read_bytes())
    assert finding["slice_range"] is not None and kept.first <= kept.last
    tail.drain(2.0)
    assert len(tail.of(t.findings, study_uid=uid)) == 1  # restored, not published again
    survivor.kill(signal.SIGTERM)
