"""The operator page in a real headless browser (Debian's chromium driven by Playwright),
against a real Kafka, a real `radtriage worker` and the HTTP server started with start_http.

Two head CTs go through the worker: A (its pixels are missing: dead-lettered at
preprocessing, then replayed from the page) and B (real DICOM in the blob store; no
Triton answers, so it waits on the stat lane while the worker retries). A positive
finding for A, published here in Triton's place, makes the worker alert; the test
watches it arrive on the open page without a reload, acknowledges it, checks the audit
event on `triage.audit`, and that a second browser and a restarted server agree.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from kafka import KafkaProducer
from playwright.sync_api import BrowserContext, Page, Playwright, expect, sync_playwright

from connectors.http.server import HttpHandle, start_http
from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from radtriage.blobstore import LocalBlobStore
from radtriage.operator import page as operator_page
from radtriage.replay import REPLAY_HEADER
from radtriage.settings import Settings
from schemas.alerts import Alert
from schemas.instances import InstanceEvent
from tests.integration.harness import Worker
from tests.support.findings import ich_alert, ich_result
from tests.support.kafka import Tail
from tests.support.net import free_port

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MRN = "MRN-OPERATOR-PAGE-SENTINEL"
WAIT_MS = 90_000


class Server:
    """start_http on a free port, in an event loop of its own thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.handle: HttpHandle | None = None

    def start(self) -> str:
        self.settings.http.port = free_port()
        self.handle = asyncio.run_coroutine_threadsafe(
            start_http(self.settings, pages=[operator_page]), self.loop
        ).result(30)
        return f"http://127.0.0.1:{self.handle.port}"

    def stop(self) -> None:
        if self.handle is not None:
            asyncio.run_coroutine_threadsafe(self.handle.stop(), self.loop).result(60)
            self.handle = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


def browser(p: Playwright, profile: Path) -> BrowserContext:
    """A fresh chromium profile (its own localStorage), Debian's binary, no downloads."""
    return p.chromium.launch_persistent_context(
        str(profile),
        executable_path=CHROMIUM,
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1600, "height": 1200},
    )


def server_settings(settings: Settings) -> Settings:
    s = settings.model_copy(deep=True)
    s.http.bind_address = "127.0.0.1"
    s.operator.push_interval_s = 0.2
    return s


def instances(study_uid: str, accession: str, uris: list[str], sops: list[str]) -> list[InstanceEvent]:
    events = [
        InstanceEvent(
            study_uid=study_uid,
            series_uid=study_uid + ".1",
            sop_instance_uid=sop,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            modality="CT",
            body_part="HEAD",
            series_description="CT HEAD WO CONTRAST",
            accession_number=accession,
            patient_id=MRN,
            blob_uri=uri,
        )
        for uri, sop in zip(uris, sops, strict=True)
    ]
    marker = InstanceEvent(kind="transfer_complete", study_uid=study_uid, instance_count=len(events))
    return [*events, marker]


def real_series(settings: Settings, tmp: Path, study_uid: str, accession: str) -> list[InstanceEvent]:
    """A normal head-CT phantom written as DICOM into the worker's blob store."""
    phantom = head_ct_phantom(np.random.default_rng(6), bleed=False)
    series_uid = study_uid + ".1"
    files = write_ct_series(
        phantom.hu, phantom.spacing_zyx, tmp / "dicom" / study_uid, study_uid=study_uid, series_uid=series_uid
    )
    blobs = LocalBlobStore(settings.blob_dir)
    uris, sops = [], []
    for f in files:
        sop = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        uris.append(blobs.put_instance(study_uid, series_uid, sop, f.read_bytes()))
        sops.append(sop)
    return instances(study_uid, accession, uris, sops)


def produce(
    producer: KafkaProducer, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]]
) -> None:
    producer.send(topic, key=key.encode(), value=value, headers=headers).get(10)


def wait_page_live(page: Page) -> None:
    expect(page.locator("#status .pill.ok")).to_have_text("Event log: live", timeout=WAIT_MS)
    expect(page.locator("#conn")).to_have_text("connected", timeout=WAIT_MS)


def test_alert_arrives_live_is_acknowledged_on_audit_and_every_page_agrees(
    worker_env: tuple[dict[str, str], Settings], playwright: Playwright, tmp_path: Path
) -> None:
    env, settings = worker_env
    t = settings.topics
    # No Triton: B's stat request is retried for up to 3 x 10 s, so it stays on the
    # worklist while the test looks; spans go to the trace file the waterfall reads.
    env = {**env, "RADTRIAGE_TRITON__TIMEOUT_S": "10", "RADTRIAGE_TELEMETRY__EXPORTER": "jsonl"}
    worker = Worker(env, settings.home)
    worker.start()
    server = Server(server_settings(settings))
    url = server.start()
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    tail = Tail(settings.kafka.bootstrap_servers, [t.studies, t.requests_stat, t.audit, t.alert_topic("ich")])
    stamp = time.time_ns()
    study_a, study_b = f"1.2.826.0.1.3680043.10.{stamp}", f"1.2.826.0.1.3680043.11.{stamp}"
    trace_a = f"{stamp:032x}"[-32:]
    tp_a = [("traceparent", f"00-{trace_a}-00f067aa0ba902b7-01".encode())]
    try:
        first = browser(playwright, tmp_path / "profile-1")
        page = first.new_page()
        page.goto(url + "/")
        wait_page_live(page)
        expect(page.locator("#alerts .empty")).to_be_visible()
        page.evaluate("window.__loadedOnce = 'yes'")  # gone if the page ever reloads

        # A: no pixels behind its instances. B: a real series.
        a_events = instances(
            study_a,
            "ACC-A",
            [f"file:///nowhere/{i}.dcm" for i in range(10)],
            [f"{study_a}.1.{i}" for i in range(10)],
        )
        for ev in a_events:
            produce(producer, t.instances, study_a, ev.to_bytes(), tp_a)
        for ev in real_series(settings, tmp_path, study_b, "ACC-B"):
            produce(producer, t.instances, study_b, ev.to_bytes(), [])

        # B waits on the stat lane, on the page.
        expect(page.locator(f'.lane-col[data-lane="stat"] tr[data-study="{study_b}"]')).to_be_visible(
            timeout=WAIT_MS
        )
        # A is dead-lettered at preprocessing: listed with its stage and a Replay button.
        a_letter = page.locator(f'#deadletters tr[data-study="{study_a}"]')
        expect(a_letter.locator(".replay-btn")).to_be_visible(timeout=WAIT_MS)
        expect(a_letter).to_contain_text("infer.stat.preprocess")

        # Triton's answer for A, as the lane would publish it: the worker reports and alerts.
        tail.until(lambda: bool(tail.of(t.studies, study_uid=study_a)))
        (ready,) = tail.of(t.studies, study_uid=study_a)
        finding = ich_result(
            study_a,
            study_a + ".1",
            datetime.fromisoformat(ready["ready_at"]),
            accession_number="ACC-A",
            patient_id=MRN,
            probability=0.93,
            threshold=0.0519,
            received_at=datetime.fromisoformat(ready["received_at"]),
            inferred_at=datetime.now(UTC),
            inference_ms=150.0,
            request_id="",
        )
        produce(producer, t.findings, study_a, finding.to_bytes(), tp_a)
        alert_id = f"{study_a}/ICH"
        card = page.locator(f'article.alert[data-alert-id="{alert_id}"]')
        expect(card).to_be_visible(timeout=WAIT_MS)
        assert page.evaluate("window.__loadedOnce") == "yes", "the page reloaded"
        expect(card).to_have_class("alert unacked")
        expect(card).to_contain_text("ACC-A")
        expect(card).to_contain_text("p = 0.930")
        expect(card).to_contain_text("ich_classifier v1")
        tail.until(lambda: bool(tail.of(t.alert_topic("ich"), study_uid=study_a)))

        # Click the alert: its waterfall, every stage from the events' own timestamps.
        card.locator(".a2").click()
        wf = page.locator("#waterfall")
        for stage in ("received", "ready", "routed", "inferred", "reported", "alerted"):
            expect(wf.locator(f'tr.wf-stage[data-stage="{stage}"]:not(.missing)')).to_be_visible(
                timeout=WAIT_MS
            )
        expect(wf.locator("tr.wf-span").first).to_be_visible(timeout=WAIT_MS)  # the worker's spans
        expect(wf).to_contain_text("route")
        page.screenshot(path=str(tmp_path / "operator-page.png"), full_page=True)

        # Acknowledge: asks who, remembers it, and writes the audit event.
        card.locator(".ack-btn").click()
        expect(page.locator("#ack-dialog")).to_be_visible()
        page.fill("#ack-by", "Dr Page Test")
        page.click("#ack-confirm")
        expect(card.locator(".ack-by")).to_have_text("Dr Page Test", timeout=WAIT_MS)
        expect(card).to_have_class("alert acked")
        assert page.evaluate("localStorage.getItem('radtriage.operator.name')") == "Dr Page Test"

        def acked() -> list[dict[str, object]]:
            return [d for d in tail.of(t.audit, study_uid=study_a) if d["decision"] == "alert_acknowledged"]

        tail.until(lambda: bool(acked()))
        (audit,) = acked()
        assert audit["stage"] == "alert"
        assert audit["detail"]["alert_id"] == alert_id and audit["detail"]["by"] == "Dr Page Test"  # type: ignore[index]
        assert datetime.fromisoformat(audit["detail"]["at"]) <= datetime.now(UTC)  # type: ignore[index]

        # Another workstation (fresh profile) opened afterwards sees it acknowledged.
        second = browser(playwright, tmp_path / "profile-2")
        other = second.new_page()
        other.goto(url + "/")
        other_card = other.locator(f'article.alert[data-alert-id="{alert_id}"]')
        expect(other_card).to_have_class("alert acked", timeout=WAIT_MS)
        expect(other_card.locator(".ack-by")).to_have_text("Dr Page Test")
        second.close()

        # A second acknowledgement is refused; the record keeps the first.
        again = requests.post(
            url + "/operator/api/ack", json={"alert_id": alert_id, "by": "Someone Else"}, timeout=30
        )
        assert again.status_code == 409 and "Dr Page Test" in again.json()["error"]

        # Replay A's dead letter from the page: republished once, with the replay header.
        a_letter.locator(".replay-btn").click()
        expect(a_letter.locator(".replay-btn, .replayed")).to_contain_text("replayed", timeout=WAIT_MS)

        def replayed() -> list[dict[str, bytes]]:
            return [
                h
                for topic, d, h in tail.seen
                if topic == t.requests_stat and d["study_uid"] == study_a and REPLAY_HEADER in h
            ]

        tail.until(lambda: bool(replayed()))
        letter_id = a_letter.get_attribute("data-letter")
        assert letter_id and replayed()[0][REPLAY_HEADER].decode() == letter_id
        topic, partition, offset = letter_id.rsplit(":", 2)
        twice = requests.post(
            url + "/operator/api/replay",
            json={"topic": topic, "partition": int(partition), "offset": int(offset)},
            timeout=30,
        )
        assert twice.status_code == 409 and "already replayed" in twice.json()["error"]
        ledger = (settings.home / "replay" / "replayed.jsonl").read_text().splitlines()
        assert [json.loads(line)["deadletter"] for line in ledger] == [letter_id]
        tail.drain(1.0)
        assert len(replayed()) == 1

        assert MRN not in page.content()
        first.close()

        # A restarted server rebuilds the same picture from the log.
        server.stop()
        url = server.start()
        third = browser(playwright, tmp_path / "profile-3")
        fresh = third.new_page()
        fresh.goto(url + "/")
        wait_page_live(fresh)
        fresh_card = fresh.locator(f'article.alert[data-alert-id="{alert_id}"]')
        expect(fresh_card.locator(".ack-by")).to_have_text("Dr Page Test", timeout=WAIT_MS)
        fresh_letter = fresh.locator(f'#deadletters tr[data-letter="{letter_id}"]')
        expect(fresh_letter.locator(".replayed")).to_be_visible(timeout=WAIT_MS)
        assert MRN not in fresh.content()
        third.close()
    finally:
        server.close()
        producer.close()
        worker.kill()


def _alert(study_uid: str) -> Alert:
    return ich_alert(study_uid, accession_number="ACC-OK", probability=0.8, threshold=0.05)


def test_malformed_messages_and_bad_posts_do_not_break_the_page(
    worker_env: tuple[dict[str, str], Settings], playwright: Playwright, tmp_path: Path
) -> None:
    _env, settings = worker_env
    t = settings.topics
    server = Server(server_settings(settings))
    url = server.start()
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    topics = [
        t.alert_topic("ich"),
        t.alert_topic("stroke"),
        t.findings,
        t.results_fhir,
        t.requests_stat,
        t.requests_urgent,
        t.requests_routine,
        t.audit,
        t.deadletter,
        t.studies,
    ]
    bad_values = [
        b"\x00\xff\xfe garbage",
        b"",
        b'{"schema_version": 99}',
        b"[1, 2, 3]",
        _alert("1.2.3.wrong-topic").to_bytes(),  # an alert is the wrong schema everywhere but alerts
    ]
    sent_bad = 0
    try:
        ctx = browser(playwright, tmp_path / "profile")
        page = ctx.new_page()
        page.goto(url + "/")
        wait_page_live(page)
        for topic in topics:
            for value in bad_values:
                if value.startswith(b'{"schema_version":1') and topic in (
                    t.alert_topic("ich"),
                    t.alert_topic("stroke"),
                ):
                    continue  # a valid alert on an alert topic is not malformed
                producer.send(topic, key=b"poison", value=value)
                sent_bad += 1
        producer.send(t.deadletter, key=b"poison", value=None)  # a tombstone: no value at all
        sent_bad += 1
        producer.flush()
        good = f"1.2.826.0.1.3680043.12.{time.time_ns()}"
        producer.send(t.alert_topic("ich"), key=good.encode(), value=_alert(good).to_bytes()).get(10)

        # The reader went on: the good alert after the garbage is on the page, live.
        expect(page.locator(f'article.alert[data-alert-id="{good}/ICH"]')).to_be_visible(timeout=WAIT_MS)
        expect(page.locator("#status")).to_contain_text("unreadable message(s) ignored", timeout=WAIT_MS)
        state = requests.get(url + "/operator/api/state", timeout=30).json()
        assert sum(state["unreadable"].values()) == sent_bad
        assert [a["alert_id"] for a in state["alerts"]] == [f"{good}/ICH"]
        assert state["event_log"]["available"] is True

        ack = url + "/operator/api/ack"
        replay = url + "/operator/api/replay"
        cases: list[tuple[str, dict[str, object], int]] = [
            (ack, {"data": b"not json", "headers": {"Content-Type": "application/json"}}, 400),
            (ack, {"data": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}, 400),
            (ack, {"data": b'{"alert_id": "x"}', "headers": {"Content-Type": "text/plain"}}, 415),
            (ack, {"json": []}, 400),
            (ack, {"json": {"alert_id": f"{good}/ICH"}}, 400),
            (ack, {"json": {"alert_id": f"{good}/ICH", "by": ""}}, 400),
            (ack, {"json": {"alert_id": f"{good}/ICH", "by": "x" * 65}}, 400),
            (ack, {"json": {"alert_id": "1.2.3/ICH", "by": "JD"}}, 404),
            (
                ack,
                {"data": b"{" + b" " * (64 << 10) + b"}", "headers": {"Content-Type": "application/json"}},
                413,
            ),
            (replay, {"json": {"topic": t.deadletter}}, 400),
            (replay, {"json": {"topic": t.deadletter, "partition": "0", "offset": 1}}, 400),
            (replay, {"json": {"topic": t.deadletter, "partition": 0, "offset": -1}}, 400),
            (replay, {"json": {"topic": t.deadletter, "partition": 0, "offset": 999999}}, 404),
        ]
        for target, kwargs, status in cases:
            res = requests.post(target, timeout=30, **kwargs)  # type: ignore[arg-type]
            assert res.status_code == status, (target, kwargs, res.status_code, res.text[:200])
            assert res.headers["Content-Type"].startswith("application/json")
            assert res.json()["error"]
        assert requests.get(ack, timeout=30).status_code == 405
        assert requests.get(url + "/operator/studies/1.2.3.unknown", timeout=30).status_code == 404

        # Nothing above was recorded, and the page is still live and unacknowledged.
        expect(page.locator(f'article.alert.unacked[data-alert-id="{good}/ICH"]')).to_be_visible()
        wait_page_live(page)
        ctx.close()
    finally:
        server.close()
        producer.close()


def test_kafka_down_the_page_says_so_and_keeps_serving(playwright: Playwright, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    settings.kafka.bootstrap_servers = f"127.0.0.1:{free_port()}"  # nothing listens there
    settings.kafka.produce_timeout_s = 2
    settings.operator.retry_s = 1
    server = Server(server_settings(settings))
    url = server.start()
    try:
        ctx = browser(playwright, tmp_path / "profile")
        page = ctx.new_page()
        page.goto(url + "/")
        expect(page.locator("#status .pill.down")).to_have_text(
            "Event log unavailable — retrying", timeout=WAIT_MS
        )
        expect(page.locator("#conn")).to_have_text("connected", timeout=WAIT_MS)  # the SSE stream is up
        res = requests.post(url + "/operator/api/ack", json={"alert_id": "x/ICH", "by": "JD"}, timeout=30)
        assert res.status_code == 404 and res.json()["error"]
        ctx.close()
    finally:
        server.close()
