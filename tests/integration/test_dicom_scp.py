"""The DICOM listener against a real Kafka, driven by dcmtk's storescu and pynetdicom."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import BasicTextSRStorage, CTImageStorage  # type: ignore[attr-defined]

from connectors.dicom import validation as v
from connectors.dicom.scp import start_scp
from connectors.publisher import EventPublisher
from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from radtriage.kafka_admin import ensure_topics
from radtriage.settings import Settings
from tests.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def scp(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Settings]:
    settings = Settings(home=tmp_path)
    settings.kafka.bootstrap_servers = kafka_bootstrap
    settings.dicom.port = free_port()
    settings.dicom.bind_address = "127.0.0.1"
    ensure_topics(kafka_bootstrap, dict.fromkeys(settings.topics.all(), 3))
    server, handler = start_scp(settings)
    try:
        yield settings
    finally:
        server.shutdown()
        handler.publisher.close()


def _consumer(settings: Settings) -> KafkaConsumer:
    c = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers, group_id=None, enable_auto_commit=False
    )
    parts = [TopicPartition(settings.topics.instances, p) for p in range(3)]
    c.assign(parts)
    c.seek_to_end(*parts)
    for tp in parts:
        c.position(tp)
    return c


def _read(
    c: KafkaConsumer, study_uid: str, want: int, timeout: float = 30
) -> list[tuple[dict[str, Any], dict]]:
    got: list[tuple[dict[str, Any], dict]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(got) < want:
        for recs in c.poll(timeout_ms=300).values():
            for r in recs:
                data = json.loads(r.value)
                if data["study_uid"] == study_uid:
                    got.append((data, dict(r.headers or [])))
    return got


def _storescu() -> str:
    path = shutil.which("storescu")
    assert path, "dcmtk's storescu is required (scripts/install.sh --test installs it: apt-get install dcmtk)"
    return path


def _corrupt(path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    with path.open("ab") as fh:  # a valid header, then an element whose length runs off the end
        fh.write(b"\x08\x00\x18\x00UI\xff\x7f" + os.urandom(256))
    return path


def _sr(path: Path) -> Path:
    ds = Dataset()
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientName = "Secret^Name"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_storescu_series_is_published_with_a_release_marker(scp: Settings, tmp_path: Path) -> None:
    ph = head_ct_phantom(np.random.default_rng(5), bleed=False)
    files = write_ct_series(
        ph.hu,
        ph.spacing_zyx,
        tmp_path / "series",
        accession="ACC5",
        patient_id="MRN5",
        patient_name="Secret^Patient",
        shuffle_files=True,
    )
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    consumer = _consumer(scp)
    sent = subprocess.run(
        [_storescu(), "-aec", scp.dicom.ae_title, "127.0.0.1", str(scp.dicom.port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sent.returncode == 0, sent.stderr
    events = _read(consumer, study_uid, len(files) + 1)
    kinds = [e["kind"] for e, _ in events]
    assert kinds.count("instance") == len(files) and kinds[-1] == "transfer_complete"
    assert events[-1][0]["instance_count"] == len(files)
    first = events[0][0]
    assert (first["modality"], first["body_part"], first["accession_number"], first["patient_id"]) == (
        "CT",
        "HEAD",
        "ACC5",
        "MRN5",
    )
    # No PHI beyond the MRN travels in events.
    assert all("Secret" not in json.dumps(e) for e, _ in events)
    # One trace for the study: every event carries the same trace id.
    trace_ids = {h["traceparent"].split(b"-")[1] for _, h in events}
    assert len(trace_ids) == 1
    # The blobs are complete Part 10 files.
    store = Path(scp.blob_dir)
    stored = sorted(store.rglob("*.dcm"))
    assert len(stored) == len(files)
    assert dcmread(stored[0]).pixel_array.shape == (ph.hu.shape[1], ph.hu.shape[2])


def test_corrupt_and_non_image_objects_are_refused_and_the_listener_goes_on(
    scp: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ae = AE(ae_title="TEST_SCU")
    # The files' own transfer syntax only: chunked sending cannot convert.
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(BasicTextSRStorage, ExplicitVRLittleEndian)

    def send(path: Path) -> Dataset:
        # Chunked mode sends the file's bytes as they are, without pynetdicom parsing them.
        monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
        assoc = ae.associate("127.0.0.1", scp.dicom.port, ae_title=scp.dicom.ae_title)
        assert assoc.is_established
        status = assoc.send_c_store(path)  # sent as stored, without decoding
        assoc.release()
        return status

    corrupt = send(_corrupt(tmp_path / "corrupt.dcm"))
    # "Cannot understand" (0xCxxx): undecodable, or decoded into nonsense without its UIDs.
    assert int(corrupt.Status) >> 12 == 0xC and int(corrupt.Status) in (v.CANNOT_DECODE, v.MISSING_IDENTITY)
    assert str(corrupt.ErrorComment)
    sr = send(_sr(tmp_path / "sr.dcm"))
    assert int(sr.Status) == v.NOT_AN_IMAGE
    assert "pixel data" in str(sr.ErrorComment)

    # dcmtk reports the refusal to its user too.
    out = subprocess.run(
        [_storescu(), "-aec", scp.dicom.ae_title, "127.0.0.1", str(scp.dicom.port), str(tmp_path / "sr.dcm")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Error" in out.stdout + out.stderr or out.returncode != 0

    # ...and the next good study is taken.
    ph = head_ct_phantom(np.random.default_rng(6), bleed=True)
    files = write_ct_series(ph.hu, ph.spacing_zyx, tmp_path / "good")
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    consumer = _consumer(scp)
    assert (
        subprocess.run(
            [_storescu(), "-aec", scp.dicom.ae_title, "127.0.0.1", str(scp.dicom.port), *map(str, files)],
            capture_output=True,
            timeout=120,
        ).returncode
        == 0
    )
    assert len(_read(consumer, study_uid, len(files) + 1)) == len(files) + 1


def test_kafka_down_means_out_of_resources_never_success(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    settings.dicom.port = free_port()
    settings.dicom.bind_address = "127.0.0.1"
    dead = EventPublisher(f"127.0.0.1:{free_port()}", timeout_s=2.0, client_id="test-dead")
    server, _ = start_scp(settings, publisher=dead)
    try:
        ph = head_ct_phantom(np.random.default_rng(8), bleed=False)
        (first, *_) = write_ct_series(ph.hu[:2], ph.spacing_zyx, tmp_path / "s")
        ae = AE(ae_title="TEST_SCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", settings.dicom.port, ae_title=settings.dicom.ae_title)
        status = assoc.send_c_store(dcmread(first))
        assoc.release()
        assert int(status.Status) == v.OUT_OF_RESOURCES_KAFKA
    finally:
        server.shutdown()
