"""The DICOM listener against a real Kafka, driven by dcmtk's storescu and pynetdicom.

Each test publishes to its own `imaging.instances` topic, so "exactly these events"
can be asserted over the whole topic.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydicom import dcmread
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
)
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from connectors.dicom import validation as v
from connectors.dicom.listener import start_scp
from connectors.publisher import EventPublisher, PublishError
from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from radtriage.kafka_admin import ensure_topics
from schemas.instances import InstanceEvent
from tests.support.dicom import Listener, dicom_settings, send_files, storescu
from tests.support.dicom_objects import (
    MALFORMED_OBJECT_WARNINGS,
    SECRET_BIRTH_DATE,
    SECRET_NAME,
    TRUNCATED_SEQUENCE,
    header_only,
    instance,
    with_meta,
)
from tests.support.kafka import PARTITIONS, Record, read_topic
from tests.support.net import free_port
from tests.support.published import one_study, stored_as_sent

pytestmark = [pytest.mark.integration, *MALFORMED_OBJECT_WARNINGS]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Finished spans of this test (the session's provider is the SDK's, see conftest)."""
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        exporter.shutdown()  # the processor stays registered but keeps nothing more


def _pixelless_ct(path: Path) -> Path:
    """A CT image header without its pixel data: an image SOP class that is not one."""
    ds = instance(CTImageStorage, "CT")
    ds.PatientName = SECRET_NAME
    ds.PatientBirthDate = SECRET_BIRTH_DATE
    with_meta(ds).save_as(path, enforce_file_format=True)
    return path


def _series(out: Path, seed: int, *, shape: tuple[int, int, int] = (12, 64, 64), **kw: Any) -> list[Path]:
    ph = head_ct_phantom(np.random.default_rng(seed), bleed=False, shape=shape)
    return write_ct_series(
        ph.hu,
        ph.spacing_zyx,
        out,
        accession=f"ACC{seed}",
        patient_id=f"MRN{seed}",
        patient_name=SECRET_NAME,
        **kw,
    )


def _scu(ae_title: str = "TEST_SCU") -> AE:
    ae = AE(ae_title=ae_title)
    # The files' own transfer syntax only: chunked sending (below) cannot convert.
    for sop_class in (CTImageStorage, BasicTextSRStorage, EncapsulatedPDFStorage):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    return ae


def _assert_no_phi(text: str) -> None:
    assert "Secret" not in text and SECRET_BIRTH_DATE not in text


def test_storescu_series_is_published_with_a_release_marker(
    listener: Listener, spans: InMemorySpanExporter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 40 slices of 256 x 256: also the throughput measurement (acks=all, fsync per object).
    files = _series(tmp_path / "series", 5, shape=(40, 256, 256), shuffle_files=True)
    originals = {str(d.SOPInstanceUID): d for d in map(dcmread, files)}
    study_uid = str(next(iter(originals.values())).StudyInstanceUID)
    caplog.set_level(logging.INFO)

    started = time.monotonic()
    sent = send_files(listener, files)
    elapsed = time.monotonic() - started
    assert sent.returncode == 0, sent.stderr
    print(f"\nC-STORE throughput: {len(files)} instances in {elapsed:.2f} s = {len(files) / elapsed:.1f}/s")

    records = read_topic(listener.settings.kafka.bootstrap_servers, listener.topic, len(files) + 1)
    instances, _ = one_study(records, study_uid, len(files))
    # Exactly the good instances, once each, plus one marker.
    assert sorted(r.value["sop_instance_uid"] for r in instances) == sorted(originals)

    first = instances[0].value
    assert (first["modality"], first["body_part"], first["accession_number"], first["patient_id"]) == (
        "CT",
        "HEAD",
        "ACC5",
        "MRN5",
    )
    assert {r.value["calling_ae"] for r in records} == {"STORESCU"}
    for r in records:
        _assert_no_phi(json.dumps(r.value))

    # One trace per study: every event carries the study's trace, in the context of its own
    # PRODUCER span ("send <topic>", OpenTelemetry messaging conventions) under the study span.
    traceparents = [r.headers["traceparent"].decode().split("-") for r in records]
    assert len({trace for _, trace, _, _ in traceparents}) == 1
    trace_id = traceparents[0][1]
    finished: list[ReadableSpan] = list(spans.get_finished_spans())
    (study_span,) = [s for s in finished if s.name == "dicom.receive_study"]
    assert study_span.context is not None
    assert format(study_span.context.trace_id, "032x") == trace_id
    sends = {
        format(s.context.span_id, "016x"): s.parent.span_id if s.parent else 0
        for s in finished
        if s.context is not None and s.name == f"send {listener.topic}"
    }
    assert {span_id for _, _, span_id, _ in traceparents} <= set(sends)
    assert {sends[span_id] for _, _, span_id, _ in traceparents} == {study_span.context.span_id}
    assert study_span.attributes is not None and study_span.attributes["dicom.instances"] == len(files)
    stores = [s for s in finished if s.name == "dicom.c_store"]
    assert len(stores) == len(files)
    assert all(s.parent is not None and s.parent.span_id == study_span.context.span_id for s in stores)
    assert all(s.attributes is not None and s.attributes["dicom.status"] == 0 for s in stores)
    for s in [study_span, *stores]:
        _assert_no_phi(json.dumps(dict(s.attributes or {})))

    # The blobs are complete Part 10 files with the pixels that were sent.
    stored = stored_as_sent(listener.settings.blob_dir, instances, originals)
    assert stored.pixel_array.shape == (256, 256)
    _assert_no_phi(caplog.text)


def test_bad_objects_get_exact_failure_statuses_and_the_listener_goes_on(
    listener: Listener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="connectors.dicom")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(header_only(TRUNCATED_SEQUENCE))
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(header_only(random.Random(1234).randbytes(512)))
    # An image SOP class without its pixel data is still refused (0xA900); non-image
    # objects are stored (tests/integration/test_non_image_objects.py).
    pixelless = _pixelless_ct(tmp_path / "pixelless.dcm")

    # dcmtk refuses to send an object it cannot parse itself, and says so.
    for corrupt in (truncated, garbage):
        out = send_files(listener, [corrupt])
        assert out.returncode != 0 and "Bad DICOM file" in out.stdout + out.stderr, out
    # It sends a CT without pixel data and reports our refusal.
    out = send_files(listener, [pixelless])
    assert out.returncode != 0, out
    assert "Error: DataSetDoesNotMatchSOPClass" in out.stdout + out.stderr, out

    # For the exact statuses, pynetdicom in chunked mode sends each file's bytes as they
    # are, without parsing them, so the corrupt ones do reach the listener.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = _scu()
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=listener.settings.dicom.ae_title)
    assert assoc.is_established
    try:
        statuses = {
            name: assoc.send_c_store(path)
            for name, path in [("truncated", truncated), ("pixelless", pixelless)]
        }
        garbage_status = assoc.send_c_store(garbage)
        echo = assoc.send_c_echo()
    finally:
        assoc.release()
    assert int(statuses["truncated"].Status) == v.CANNOT_DECODE == 0xC210
    assert "cannot be decoded" in str(statuses["truncated"].ErrorComment)
    # Random bytes may decode into nonsense without UIDs, or not decode at all: either
    # way "Cannot Understand".
    assert int(garbage_status.Status) in (v.CANNOT_DECODE, v.MISSING_IDENTITY)
    assert str(garbage_status.ErrorComment)
    assert int(statuses["pixelless"].Status) == v.NOT_AN_IMAGE == 0xA900
    assert "no pixel data" in str(statuses["pixelless"].ErrorComment)
    assert int(echo.Status) == 0x0000  # the listener is alive and well

    # Every refusal was logged at WARNING with its status, and without PHI.
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "refused" in r.getMessage())
    assert sum("refused 0xC210" in m for m in refusals) >= 1
    assert sum("refused 0xA900" in m for m in refusals) == 2  # storescu once, pynetdicom once
    assert all("from STORESCU" in m or "from TEST_SCU" in m for m in refusals)
    _assert_no_phi(caplog.text)

    # ...and the next good study is taken; the bad objects left no event behind.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", False)
    files = _series(tmp_path / "good", 6)
    assert send_files(listener, files).returncode == 0
    records = read_topic(listener.settings.kafka.bootstrap_servers, listener.topic, len(files) + 1)
    assert [r.value["kind"] for r in records].count("instance") == len(files)
    assert [r.value["kind"] for r in records].count("transfer_complete") == 1
    assert len(records) == len(files) + 1
    assert len(list(listener.settings.blob_dir.rglob("*.dcm"))) == len(files)


def test_release_marks_each_study_and_abort_marks_none(listener: Listener, tmp_path: Path) -> None:
    a = _series(tmp_path / "a", 7, shape=(3, 32, 32))
    b = _series(tmp_path / "b", 8, shape=(2, 32, 32))
    c = _series(tmp_path / "c", 9, shape=(2, 32, 32))
    ae = _scu()
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=listener.settings.dicom.ae_title)
    for f in [*a, *b]:  # two studies in one association
        assert int(assoc.send_c_store(dcmread(f)).Status) == 0
    assoc.release()
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=listener.settings.dicom.ae_title)
    for f in c:
        assert int(assoc.send_c_store(dcmread(f)).Status) == 0
    assoc.abort()

    records = read_topic(listener.settings.kafka.bootstrap_servers, listener.topic, 3 + 2 + 2 + 2, settle_s=3)
    by_study: dict[str, list[Record]] = {}
    for r in records:
        by_study.setdefault(r.value["study_uid"], []).append(r)
    uid = {name: str(dcmread(files[0]).StudyInstanceUID) for name, files in (("a", a), ("b", b), ("c", c))}
    for name, n in (("a", 3), ("b", 2)):
        study = sorted(by_study[uid[name]], key=lambda r: r.offset)
        assert [r.value["kind"] for r in study] == ["instance"] * n + ["transfer_complete"]
        assert study[-1].value["instance_count"] == n
        assert len({r.partition for r in study}) == 1
    # Aborted: the instances are in, no marker (the quiet period finishes the study).
    assert [r.value["kind"] for r in by_study[uid["c"]]] == ["instance", "instance"]
    assert len(records) == 9


class _Forwarder:
    """A TCP port that forwards to Kafka once opened: a broker that 'comes up' later."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self._server: socket.socket | None = None

    def open(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._server is not None
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


def test_kafka_down_means_out_of_resources_never_success_and_recovery_needs_no_restart(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The listener starts while "Kafka" (a closed port) is down, with a short timeout.
    down_port = free_port()
    settings = dicom_settings(tmp_path / "home", f"127.0.0.1:{down_port}", partitions=None)
    ensure_topics(kafka_bootstrap, {settings.topics.instances: PARTITIONS})
    publisher = EventPublisher(settings.kafka.bootstrap_servers, timeout_s=2.0, client_id="test-down")
    _server, stop = start_scp(settings, publisher=publisher)
    forwarder = _Forwarder(down_port, ("127.0.0.1", int(kafka_bootstrap.rsplit(":", 1)[1])))
    caplog.set_level(logging.WARNING, logger="connectors.dicom")
    try:
        files = _series(tmp_path / "s", 10, shape=(2, 32, 32))
        ae = _scu()
        assoc = ae.associate("127.0.0.1", settings.dicom.port, ae_title=settings.dicom.ae_title)
        started = time.monotonic()
        status = assoc.send_c_store(dcmread(files[0]))
        answered_in = time.monotonic() - started
        assert int(status.Status) == v.OUT_OF_RESOURCES_KAFKA == 0xA700
        assert "retry" in str(status.ErrorComment)
        assert answered_in < 2.0 + 3.0  # bounded by the produce timeout, not hanging
        assert int(assoc.send_c_echo().Status) == 0  # and the listener still answers
        assoc.release()
        # dcmtk's view of the same refusal.
        out = storescu(
            "-v", "-aec", settings.dicom.ae_title, "127.0.0.1", str(settings.dicom.port), str(files[0])
        )
        assert out.returncode != 0 and "Refused: OutOfResources" in out.stdout + out.stderr, out
        # Nothing was acknowledged, so no marker was even attempted.
        assert "refused 0xA700" in caplog.text and "transfer-complete" not in caplog.text

        # Kafka comes up: the very next C-STORE succeeds, no restart needed.
        forwarder.open()
        assert send_files(Listener(settings, stop), files).returncode == 0
        records = read_topic(kafka_bootstrap, settings.topics.instances, len(files) + 1)
        assert sorted(r.value["kind"] for r in records) == ["instance", "instance", "transfer_complete"]
    finally:
        stop()
        publisher.close()
        forwarder.close()


def test_a_storage_failure_is_out_of_resources_too(kafka_bootstrap: str, tmp_path: Path) -> None:
    # Kafka is up (the event goes out while the instance is written), the disk is not.
    settings = dicom_settings(tmp_path / "home", kafka_bootstrap)
    settings.home.mkdir(parents=True)
    settings.blob_dir.write_bytes(b"")  # a file where the store's directory should be
    _server, stop = start_scp(settings)
    try:
        (first,) = _series(tmp_path / "s", 11, shape=(1, 32, 32))
        assoc = _scu().associate("127.0.0.1", settings.dicom.port, ae_title=settings.dicom.ae_title)
        status = assoc.send_c_store(dcmread(first))
        assoc.release()
        assert int(status.Status) == v.OUT_OF_RESOURCES_STORAGE == 0xA701
        assert "retry" in str(status.ErrorComment)
    finally:
        stop()


def test_publishers_queued_behind_a_failed_connect_fail_fast() -> None:
    # Kafka is down: the first publish waits its timeout to connect; the ones queued
    # behind it get the same answer at once instead of a full timeout each, so no
    # sender waits a multiple of the timeout.
    publisher = EventPublisher(f"127.0.0.1:{free_port()}", timeout_s=1.5, client_id="test-herd")
    event = InstanceEvent(study_uid="1.2.3")
    took: list[float] = []

    def attempt() -> None:
        started = time.monotonic()
        with pytest.raises(PublishError, match="unreachable"):
            publisher.publish("imaging.instances", "1.2.3", event)
        took.append(time.monotonic() - started)

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    publisher.close()
    assert len(took) == 4 and max(took) < 1.5 * 2, took
    with pytest.raises(PublishError, match="closed"):
        publisher.publish("imaging.instances", "1.2.3", event)


def test_concurrent_associations_keep_their_own_counts(listener: Listener, tmp_path: Path) -> None:
    # Three storescu processes at once (one thread each in the listener): study X split
    # over two of them, study Y whole in the third.
    x = _series(tmp_path / "x", 12, shape=(10, 32, 32))
    y = _series(tmp_path / "y", 13, shape=(6, 32, 32))
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda files: send_files(listener, files), [x[:5], x[5:], y]))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]

    records = read_topic(listener.settings.kafka.bootstrap_servers, listener.topic, 10 + 6 + 3)
    uid_x, uid_y = (str(dcmread(files[0]).StudyInstanceUID) for files in (x, y))
    markers = {
        uid: sorted(
            (r.value["instance_count"], r.value["association_id"])
            for r in records
            if r.value["study_uid"] == uid and r.value["kind"] == "transfer_complete"
        )
        for uid in (uid_x, uid_y)
    }
    # One marker per (association, study), each counting only its own association's part.
    assert [n for n, _ in markers[uid_x]] == [5, 5] and markers[uid_x][0][1] != markers[uid_x][1][1]
    assert [n for n, _ in markers[uid_y]] == [6]
    assert sum(r.value["kind"] == "instance" for r in records) == 16 and len(records) == 19
