"""DICOMweb STOW-RS against a real Kafka, driven by the real dicomweb-client (and requests
for the bytes a client library would refuse to send).

Each test publishes to its own `imaging.instances` topic, so "exactly these events"
can be asserted over the whole topic.
"""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import BasicTextSRStorage, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from connectors.dicom import validation as v
from connectors.publisher import EventPublisher
from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from radtriage.kafka_admin import ensure_topics
from radtriage.settings import Settings
from tests.support.dicom_objects import (
    MALFORMED_OBJECT_WARNINGS,
    SECRET_BIRTH_DATE,
    SECRET_NAME,
    TRUNCATED_SEQUENCE,
    header_only,
    instance,
    part10,
    with_meta,
)
from tests.support.http import (
    Intake,
    healthy,
    http_settings,
    running_intake,
    start_http_process,
    start_intake,
    stop_intake,
)
from tests.support.kafka import PARTITIONS, read_topic
from tests.support.net import free_port
from tests.support.process import wait_ready
from tests.support.published import one_study, stored_as_sent

pytestmark = [pytest.mark.integration, *MALFORMED_OBJECT_WARNINGS]

PUBLIC_BASE = "https://pacs-gw.example.org"
BOUNDARY = "radtriage-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
TIMEOUT = (5, 120)


# -- a server in a background event loop ----------------------------------------------


def _settings(home: Path, bootstrap: str) -> Settings:
    settings = http_settings(home, bootstrap, ("instances",))
    # dicomweb-client sends `Host` without the port; behind a proxy the base is configured anyway.
    settings.http.public_base_url = PUBLIC_BASE
    return settings


@pytest.fixture
def intake(kafka_bootstrap: str, tmp_path: Path, loop: asyncio.AbstractEventLoop) -> Iterator[Intake]:
    with running_intake(_settings(tmp_path / "home", kafka_bootstrap), loop) as server:
        yield server


# -- DICOM test objects -----------------------------------------------------------------


def series(out: Path, seed: int, slices: int = 12) -> list[Dataset]:
    ph = head_ct_phantom(np.random.default_rng(seed), bleed=False, shape=(slices, 64, 64))
    files = write_ct_series(
        ph.hu, ph.spacing_zyx, out, accession=f"ACC{seed}", patient_id=f"MRN{seed}", patient_name=SECRET_NAME
    )
    datasets = [dcmread(f) for f in files]
    for ds in datasets:
        ds.PatientBirthDate = SECRET_BIRTH_DATE
    return datasets


def structured_report() -> Dataset:
    ds = instance(BasicTextSRStorage, "SR")
    ds.PatientName = SECRET_NAME
    return with_meta(ds)


def pixelless_ct() -> Dataset:
    """A CT image header without pixel data: the image SOP class is not kept."""
    ds = structured_report()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.Modality = "CT"
    return ds


def multipart(parts: list[bytes]) -> bytes:
    body = b""
    for data in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def failed_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    return body.get("00081198", {}).get("Value", [])


def referenced_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    return body.get("00081199", {}).get("Value", [])


def _no_phi(text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    assert b"Secret" not in data and SECRET_BIRTH_DATE.encode() not in data


# -- tests --------------------------------------------------------------------------------


def test_dicomweb_client_stores_a_series_published_with_one_marker(intake: Intake, tmp_path: Path) -> None:
    datasets = series(tmp_path / "series", 5)
    study_uid = str(datasets[0].StudyInstanceUID)
    client = DICOMwebClient(url=f"{intake.base}/dicomweb")

    response = client.store_instances(datasets)

    assert "FailedSOPSequence" not in response
    assert response.RetrieveURL == f"{PUBLIC_BASE}/dicomweb/studies/{study_uid}"
    referenced = {str(item.ReferencedSOPInstanceUID): item for item in response.ReferencedSOPSequence}
    assert sorted(referenced) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    for ds in datasets:
        item = referenced[str(ds.SOPInstanceUID)]
        assert item.ReferencedSOPClassUID == CTImageStorage
        assert item.RetrieveURL == (
            f"{PUBLIC_BASE}/dicomweb/studies/{study_uid}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        )

    records = read_topic(intake.settings.kafka.bootstrap_servers, intake.topic, len(datasets) + 1)
    instances, marker = one_study(records, study_uid, len(datasets))
    assert marker.value["source"] == "dicomweb"
    assert {r.value["source"] for r in instances} == {"dicomweb"}
    first = instances[0].value
    assert (first["modality"], first["body_part"], first["accession_number"], first["patient_id"]) == (
        "CT",
        "HEAD",
        "ACC5",
        "MRN5",
    )
    # One trace for the study (each record in the context of its own "send" PRODUCER span).
    assert len({r.headers["traceparent"].split(b"-")[1] for r in records}) == 1
    for r in records:
        _no_phi(r.raw)

    # Every event's blob exists and is the complete Part 10 file that was sent.
    stored_as_sent(intake.settings.blob_dir, instances, {str(ds.SOPInstanceUID): ds for ds in datasets})


def test_good_and_bad_parts_get_202_with_failure_reasons(intake: Intake, tmp_path: Path) -> None:
    datasets = series(tmp_path / "series", 6, slices=3)
    sr = structured_report()
    pixelless = pixelless_ct()
    garbage = part10(datasets[0])[:200] + random.Random(7).randbytes(300)
    body = multipart(
        [
            part10(datasets[0]),
            header_only(TRUNCATED_SEQUENCE),
            part10(datasets[1]),
            part10(sr),
            part10(pixelless),
            part10(datasets[2]),
        ]
    )
    r = requests.post(
        f"{intake.base}/dicomweb/studies", data=body, headers={"Content-Type": STOW_TYPE}, timeout=TIMEOUT
    )
    assert r.status_code == 202, r.text
    assert r.headers["Content-Type"] == "application/dicom+json"
    answer = r.json()
    # A non-image object (the SR) is stored like an image: only broken objects fail.
    assert len(referenced_items(answer)) == 4
    assert str(sr.SOPInstanceUID) in {item["00081155"]["Value"][0] for item in referenced_items(answer)}
    failures = {
        item["00081155"].get("Value", [""])[0]: (item["00081197"]["Value"][0], item["00000902"]["Value"][0])
        for item in failed_items(answer)
    }
    assert failures[str(pixelless.SOPInstanceUID)][0] == v.NOT_AN_IMAGE == 0xA900
    assert "no pixel data" in failures[str(pixelless.SOPInstanceUID)][1]
    assert sorted(code for code, _ in failures.values()) == [v.NOT_AN_IMAGE, v.CANNOT_DECODE]
    assert any("cannot be decoded" in reason for _, reason in failures.values())

    # The real client sees the same 202 as a dataset with both sequences.
    client = DICOMwebClient(url=f"{intake.base}/dicomweb")
    more = series(tmp_path / "more", 7, slices=2)
    response = client.store_instances([*more, pixelless_ct(), structured_report()])
    assert len(response.ReferencedSOPSequence) == 3
    (failed,) = response.FailedSOPSequence
    assert failed.FailureReason == 0xA900

    # A part that is not DICOM at all, alone: 409, nothing stored.
    r = requests.post(
        f"{intake.base}/dicomweb/studies",
        data=multipart([garbage]),
        headers={"Content-Type": STOW_TYPE},
        timeout=TIMEOUT,
    )
    assert r.status_code == 409 and not referenced_items(r.json())

    # Instances: 3 CT + SR, then 2 CT + SR; one marker per study per request (CT, SR, CT, SR).
    records = read_topic(intake.settings.kafka.bootstrap_servers, intake.topic, 4 + 2 + 3 + 2)
    kinds = sorted(r.value["kind"] for r in records)
    assert kinds == ["instance"] * 7 + ["transfer_complete"] * 4
    counts = sorted(r.value["instance_count"] for r in records if r.value["kind"] == "transfer_complete")
    assert counts == [1, 1, 2, 3]
    srs = [r.value for r in records if r.value["kind"] == "instance" and r.value["modality"] == "SR"]
    assert len(srs) == 2
    assert all((e["has_pixels"], e["frames"], e["rows"]) == (False, 0, 0) for e in srs)
    assert all(e["transfer_syntax_uid"] == ExplicitVRLittleEndian for e in srs)
    for r in records:
        _no_phi(r.raw)
    assert len(list(intake.settings.blob_dir.rglob("*.dcm"))) == 7  # 5 CT + 2 SR


def test_instances_of_another_study_fail_under_a_study_url(intake: Intake, tmp_path: Path) -> None:
    datasets = series(tmp_path / "series", 8, slices=2)
    other = generate_uid()
    r = requests.post(
        f"{intake.base}/dicomweb/studies/{other}",
        data=multipart([part10(ds) for ds in datasets]),
        headers={"Content-Type": STOW_TYPE},
        timeout=TIMEOUT,
    )
    assert r.status_code == 409, r.text
    assert [item["00081197"]["Value"][0] for item in failed_items(r.json())] == [v.DATASET_MISMATCH] * 2
    # The right study URL takes them, and says where the study is.
    study = str(datasets[0].StudyInstanceUID)
    client = DICOMwebClient(url=f"{intake.base}/dicomweb")
    response = client.store_instances(datasets, study_instance_uid=study)
    assert len(response.ReferencedSOPSequence) == 2
    assert response.RetrieveURL == f"{PUBLIC_BASE}/dicomweb/studies/{study}"
    records = read_topic(intake.settings.kafka.bootstrap_servers, intake.topic, 3)
    assert sorted(r.value["kind"] for r in records) == ["instance", "instance", "transfer_complete"]


def test_wrong_content_types_are_415(intake: Intake, tmp_path: Path) -> None:
    (ds,) = series(tmp_path / "series", 9, slices=1)
    url = f"{intake.base}/dicomweb/studies"
    for content_type in (
        "application/dicom",
        "application/json",
        f"multipart/related; boundary={BOUNDARY}",
        f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
        "",
    ):
        headers = {"Content-Type": content_type} if content_type else {}
        r = requests.post(url, data=multipart([part10(ds)]), headers=headers, timeout=TIMEOUT)
        assert r.status_code == 415, (content_type, r.text)
        assert "multipart/related" in r.json()["error"]
    r = requests.post(url, data=b"--x--", headers={"Content-Type": STOW_TYPE}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]
    assert read_topic(intake.settings.kafka.bootstrap_servers, intake.topic, 1, timeout_s=2, settle_s=0) == []


def test_kafka_down_is_503_with_out_of_resources(
    kafka_bootstrap: str, tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    settings = _settings(tmp_path / "home", f"127.0.0.1:{free_port()}")
    publisher = EventPublisher(settings.kafka.bootstrap_servers, timeout_s=1.5, client_id="test-stow-down")
    server = start_intake(settings, loop, publisher)
    try:
        datasets = series(tmp_path / "series", 10, slices=4)
        started = time.monotonic()
        r = requests.post(
            f"{server.base}/dicomweb/studies",
            data=multipart([part10(ds) for ds in datasets]),
            headers={"Content-Type": STOW_TYPE},
            timeout=TIMEOUT,
        )
        # One produce timeout for the whole request, not one per instance.
        assert time.monotonic() - started < 1.5 + 3
        assert r.status_code == 503 and r.headers["Retry-After"] == "5", r.text
        codes = [item["00081197"]["Value"][0] for item in failed_items(r.json())]
        assert codes == [v.OUT_OF_RESOURCES_KAFKA] * len(datasets)
        assert requests.get(f"{server.base}/healthz", timeout=TIMEOUT).status_code == 503
    finally:
        stop_intake(server)
        publisher.close()


def test_sigterm_lets_a_request_in_flight_finish(kafka_bootstrap: str, tmp_path: Path) -> None:
    """`radtriage http` receives SIGTERM while a slow sender is mid-request: the request
    still completes (200, every instance on Kafka) and the process exits 0."""
    port = free_port()
    settings = _settings(tmp_path / "home", kafka_bootstrap)
    ensure_topics(kafka_bootstrap, {settings.topics.instances: PARTITIONS})
    proc = start_http_process(settings, port, tmp_path / "http.log", "instances")
    datasets = series(tmp_path / "series", 11, slices=4)
    first_sent = threading.Event()

    def slow_body() -> Iterator[bytes]:
        for i, ds in enumerate(datasets):
            yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part10(ds) + b"\r\n"
            if i == 0:
                first_sent.set()
            time.sleep(0.5)
        yield f"--{BOUNDARY}--\r\n".encode()

    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(proc, lambda: healthy(base), tmp_path / "http.log", "radtriage http never became healthy")
        result: dict[str, requests.Response] = {}
        sender = threading.Thread(
            target=lambda: result.setdefault(
                "r",
                requests.post(
                    f"{base}/dicomweb/studies",
                    data=slow_body(),
                    headers={"Content-Type": STOW_TYPE},
                    timeout=TIMEOUT,
                ),
            )
        )
        sender.start()
        assert first_sent.wait(30)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        sender.join(60)
        assert result["r"].status_code == 200, result["r"].text
        assert len(referenced_items(result["r"].json())) == len(datasets)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = (tmp_path / "http.log").read_text()
    assert "HTTP intake stopped" in text and "POST /dicomweb/studies 200" in text
    _no_phi(text)
    records = read_topic(kafka_bootstrap, settings.topics.instances, len(datasets) + 1)
    assert sorted(r.value["kind"] for r in records) == ["instance"] * len(datasets) + ["transfer_complete"]
