"""Triton failing under a real worker: retries, stat-first recovery, dead letters and replay.

Everything is real: a Triton of our own (this test stops it, so not the session one),
a `radtriage worker` process, Kafka, DICOM series in the worker's blob store, and the
`radtriage replay` command. Assertions are counts and orders, never durations.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from radtriage.replay import REPLAY_HEADER
from radtriage.settings import REPO_ROOT, Settings
from radtriage.stack.triton import LocalTriton
from tests.integration.harness import Studies, Worker
from tests.support.kafka import Tail
from tests.support.net import free_port
from tests.support.process import run_replay
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def own_triton(tmp_path: Path) -> Iterator[LocalTriton]:
    """A Triton on free ports serving the repo's models, not started: each test decides when."""
    server = LocalTriton(
        REPO_ROOT / "deploy" / "triton" / "model_repository",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_file=tmp_path / "own-triton.log",
        extra_pythonpath=[REPO_ROOT],
    )
    try:
        yield server
    finally:
        server.stop()


def _worker(env: dict[str, str], settings: Settings, triton: LocalTriton, timeout_s: float) -> Worker:
    worker = Worker(
        {**env, "RADTRIAGE_TRITON__GRPC_URL": triton.grpc_url, "RADTRIAGE_TRITON__TIMEOUT_S": str(timeout_s)},
        settings.home,
    )
    worker.start()
    return worker


def _retried(settings: Settings, study_uid: str) -> int:
    """Failed Triton attempts the worker logged for a study (streams/agents.py `_infer_one`)."""
    log = (settings.home / "worker.log").read_text(errors="replace")
    return sum(1 for line in log.splitlines() if "Triton attempt" in line and study_uid in line)


def _assert_one_report_and_alert_per_bleed(tail: Tail, settings: Settings, studies: Studies) -> None:
    t = settings.topics
    for uid in studies.lane:
        (finding,) = tail.of(t.findings, study_uid=uid)
        assert len(tail.of(t.results_fhir, study_uid=uid)) == 1, uid
        alerts = tail.of(t.alert_topic("ich"), study_uid=uid)
        if uid in studies.bleeds:
            assert finding["positive"], finding  # a >= 5 mL bleed: the model sees it
        assert len(alerts) == (1 if finding["positive"] else 0), (uid, finding["probability"])
        if alerts:  # the emergency team is told which slices to open, as the report says
            assert finding["slice_range"] is not None, finding
            assert alerts[0]["slice_range"] == finding["slice_range"], alerts[0]
        assert finding["lane"] == studies.lane[uid]


def test_triton_restarted_within_the_deadline_loses_nothing_and_drains_stat_first(
    worker_env: tuple[dict[str, str], Settings], own_triton: LocalTriton, tmp_path: Path
) -> None:
    env, settings = worker_env
    t = settings.topics
    own_triton.start()
    # A deadline (3 x timeout) far beyond this outage: the retries must carry it.
    worker = _worker(env, settings, own_triton, timeout_s=60)
    tail = Tail(
        settings.kafka.bootstrap_servers, [t.findings, t.results_fhir, t.alert_topic("ich"), t.deadletter]
    )
    studies = Studies(settings, tmp_path)

    # One study through a healthy Triton first: the worker's channel is connected when it dies.
    warm = studies.send("stat", bleed=False)
    tail.until(lambda: len(tail.of(t.findings, study_uid=warm)) == 1, timeout=180)
    del studies.lane[warm]

    own_triton.stop()
    # The routine backlog is queued first; the stat work arrives behind it.
    routine = [studies.send("routine", bleed=b) for b in (True, True, False)]
    # As many stat studies as the stat lane runs at once, so all of them are retrying
    # when Triton returns (stat lane concurrency is 2 by default).
    stat = [studies.send("stat", bleed=True) for _ in range(settings.streams.lane_concurrency["stat"])]
    wait_until(
        lambda: all(_retried(settings, uid) for uid in stat), "every stat request retrying", 300, interval=0.5
    )

    own_triton.start()
    tail.until(
        lambda: all(
            len(tail.of(t.findings, study_uid=uid)) == 1 and len(tail.of(t.results_fhir, study_uid=uid)) == 1
            for uid in studies.lane
        ),
        timeout=300,
    )
    tail.until(lambda: len(tail.of(t.alert_topic("ich"))) >= len(studies.bleeds))
    tail.drain(3.0)  # time for a duplicate to show up, if there were one

    _assert_one_report_and_alert_per_bleed(tail, settings, studies)
    assert tail.of(t.deadletter) == []
    assert len(tail.of(t.alert_topic("ich"))) == sum(1 for f in tail.of(t.findings) if f["positive"])
    # Stat drains first: every stat finding was inferred before any routine one.
    inferred = {
        uid: datetime.fromisoformat(tail.of(t.findings, study_uid=uid)[0]["inferred_at"])
        for uid in studies.lane
    }
    assert max(inferred[uid] for uid in stat) < min(inferred[uid] for uid in routine), inferred
    assert all(_retried(settings, uid) >= 1 for uid in stat)
    worker.kill()


def test_triton_down_past_the_deadline_dead_letters_then_replay_recovers_once(
    worker_env: tuple[dict[str, str], Settings], own_triton: LocalTriton, tmp_path: Path
) -> None:
    env, settings = worker_env
    t = settings.topics
    # Triton is not running yet; 3 x 2 s and each request gives up.
    worker = _worker(env, settings, own_triton, timeout_s=2)
    tail = Tail(
        settings.kafka.bootstrap_servers,
        [t.findings, t.results_fhir, t.alert_topic("ich"), t.deadletter, t.requests_stat, t.requests_routine],
    )
    studies = Studies(settings, tmp_path)
    sent = [
        studies.send("routine", bleed=True),
        studies.send("routine", bleed=False),
        studies.send("stat", bleed=True),
        studies.send("stat", bleed=True),
    ]
    tail.until(lambda: all(tail.of(t.deadletter, study_uid=uid) for uid in sent), timeout=300)
    for uid in sent:
        (letter,) = tail.of(t.deadletter, study_uid=uid)
        lane = studies.lane[uid]
        assert letter["stage"] == f"infer.{lane}.triton" and letter["source_topic"] == t.lane_topic(lane)
        # The cause, in words: who failed and how many times we tried.
        assert letter["error"].startswith("gave up after "), letter["error"]
        assert f"Triton {own_triton.grpc_url} model ich_classifier" in letter["error"]
    assert tail.of(t.findings) == []

    own_triton.start()
    replay = run_replay(env, "--stage", "infer")
    assert replay.returncode == 0, replay.stderr
    tail.until(
        lambda: all(
            len(tail.of(t.findings, study_uid=uid)) == 1 and len(tail.of(t.results_fhir, study_uid=uid)) == 1
            for uid in sent
        ),
        timeout=300,
    )
    tail.until(lambda: len(tail.of(t.alert_topic("ich"))) >= len(studies.bleeds))
    tail.drain(3.0)

    _assert_one_report_and_alert_per_bleed(tail, settings, studies)
    assert len(tail.of(t.alert_topic("ich"))) == sum(1 for f in tail.of(t.findings) if f["positive"])
    assert len(tail.of(t.deadletter)) == len(sent)  # the replays did not fail again
    lane_messages = [h for topic, _, h in tail.seen if topic in (t.requests_stat, t.requests_routine)]
    assert len(lane_messages) == 2 * len(sent)  # the originals and one replay of each
    assert len([h for h in lane_messages if REPLAY_HEADER in h]) == len(sent)

    again = run_replay(env, "--stage", "infer")
    assert again.returncode == 0, again.stderr
    assert "already replayed" in again.stdout
    tail.drain(3.0)
    lane_messages = [h for topic, _, h in tail.seen if topic in (t.requests_stat, t.requests_routine)]
    assert len(lane_messages) == 2 * len(sent)  # nothing replayed twice
    assert len(tail.of(t.findings)) == len(sent)
    worker.kill()
