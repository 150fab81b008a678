"""Results back to the PACS (issue 18), against a REAL Orthanc as the destination: a bleed
head CT read by the real worker and Triton ends as a TID 1500 SR, a key image and a KOS in
Orthanc, in the CT's study, referencing its instances; with Orthanc down the export
retries and, once it is back, stores each object exactly once (a replayed finding re-sends
the same SOP Instance UIDs); and radtriage's own SR forwarded back to its listener is not
ingested (no export loop)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from kafka import KafkaProducer
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from processors.dicom_results import PRESENT, PROBABILITY, build_sr, encode, read_headers
from radtriage.blobstore import LocalBlobStore
from radtriage.settings import DestinationTls, DicomDestination, Settings
from schemas.findings import Finding
from schemas.requests import TriageRequest
from schemas.routing_rules import RoutingRules
from streams.dicom_send import c_store
from tests.certs import make_pki
from tests.integration.harness import RULE, Worker
from tests.support.dicom import Listener, send_files, storescu
from tests.support.findings import ich_result
from tests.support.http import Intake, http_settings, running_intake
from tests.support.kafka import Tail, read_topic
from tests.support.net import free_port
from tests.support.orthanc import Orthanc
from tests.support.series import THICK, THIN, send_series
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration


def _send_bleed(
    settings: Settings, orthanc: Orthanc | None, producer: KafkaProducer, work: Path, seed: int
) -> tuple[str, list[Path]]:
    """A bleed head CT as a PACS holds it: in Orthanc (unless it is down: None), in the
    worker's blob store (as the listener would have stored it), then its stat-lane request."""
    phantom = head_ct_phantom(np.random.default_rng(seed), bleed=True, min_bleed_ml=5.0)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = write_ct_series(
        phantom.hu,
        phantom.spacing_zyx,
        work / study,
        study_uid=study,
        series_uid=series,
        patient_id=f"MRN{seed}",
    )
    if orthanc is not None:
        orthanc.upload(files)
    blobs = LocalBlobStore(settings.blob_dir)
    uris = tuple(
        blobs.put_instance(
            study, series, str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), f.read_bytes()
        )
        for f in files
    )
    (rule,) = [r for r in RoutingRules.load(settings.routing_rules).rules if r.id == RULE]
    now = datetime.now(UTC)
    request = TriageRequest(
        study_uid=study,
        series_uid=series,
        patient_id=f"MRN{seed}",
        instance_uris=uris,
        lane="stat",
        rule_id=RULE,
        model_name="ich_classifier",
        finding="ICH",
        threshold=rule.threshold,
        received_at=now,
        ready_at=now,
        request_id=f"{study}/{RULE}",
    )
    producer.send(settings.topics.lane_topic("stat"), key=study.encode(), value=request.to_bytes()).get(10)
    return study, files


def _results_in_orthanc(orthanc: Orthanc, study_uid: str) -> dict[str, str]:
    """SOP Instance UID -> Orthanc id of radtriage's objects (their UIDs are 2.25.*) in the study."""
    instances: list[dict[str, Any]] = orthanc.rest("GET", f"/studies/{orthanc.study_id(study_uid)}/instances")
    uids = {i["MainDicomTags"].get("SOPInstanceUID", ""): i["ID"] for i in instances}
    return {uid: oid for uid, oid in uids.items() if uid.startswith("2.25.")}


def _exports(tail: Tail, audit_topic: str, study: str) -> dict[str, list[dict[str, Any]]]:
    """The export audit events of a study, by object (sr, key_image, kos)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for a in tail.of(audit_topic, study_uid=study):
        if a["stage"] == "export":
            found.setdefault(a["detail"]["object"], []).append(a)
    return found


def _dciodvfy_errors(path: Path) -> list[str]:
    check = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]


def _small_ct(work: Path, slices: int) -> tuple[str, list[Path], list[pydicom.Dataset]]:
    """A flat CT series of a new study (no reading needed: the finding is made up), its
    files and their headers."""
    study = pydicom.uid.generate_uid()
    files = write_ct_series(np.full((slices, 16, 16), 40.0), (5.0, 1.0, 1.0), work, study_uid=study)
    return study, files, read_headers(files)


OBJECTS = ("sr", "key_image", "kos")


def _orthanc_destination(orthanc: Orthanc, **options: Any) -> dict[str, Any]:
    """Orthanc as the one export destination (RADTRIAGE_DISPATCH__DESTINATIONS entry)."""
    return {
        "name": "orthanc",
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "ae_title": orthanc.aet,
        **options,
    }


def _start_worker(
    env: dict[str, str],
    settings: Settings,
    destination: dict[str, Any],
    triton_grpc_url: str | None = None,
    **dispatch: str,
) -> tuple[Worker, Tail, KafkaProducer]:
    """A worker exporting to `destination` (with Triton when its URL is given; `dispatch`
    sets the other RADTRIAGE_DISPATCH__* settings), a tail of the findings, audit and dead
    letters, and a producer to feed it."""
    if triton_grpc_url is not None:
        env["RADTRIAGE_TRITON__GRPC_URL"] = triton_grpc_url
        env["RADTRIAGE_TRITON__TIMEOUT_S"] = "30"
    env["RADTRIAGE_DISPATCH__DESTINATIONS"] = json.dumps([destination])
    for name, value in dispatch.items():
        env[f"RADTRIAGE_DISPATCH__{name.upper()}"] = value
    worker = Worker(env, settings.home)
    worker.start()
    t = settings.topics
    tail = Tail(settings.kafka.bootstrap_servers, [t.findings, t.audit, t.deadletter])
    return worker, tail, KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")


def test_a_bleed_ends_as_sr_key_image_and_kos_in_orthanc_once_even_with_orthanc_down(
    worker_env: tuple[dict[str, str], Settings], triton_grpc_url: str, tmp_path: Path
) -> None:
    env, settings = worker_env
    t = settings.topics
    orthanc = Orthanc(tmp_path / "pacs")
    orthanc.start()
    try:
        destination = _orthanc_destination(
            orthanc, objects=list(OBJECTS), findings=["ICH"], positive_only=True
        )
        worker, tail, producer = _start_worker(
            env,
            settings,
            destination,
            triton_grpc_url,
            retry_initial_s="0.5",
            retry_max_s="2",
            retry_deadline_s="600",
            timeout_s="5",
        )

        # 1. Orthanc up: SR, key image and KOS land in the CT's study.
        study, _ = _send_bleed(settings, orthanc, producer, tmp_path / "ct", seed=1801)
        tail.until(lambda: len(_exports(tail, t.audit, study)) == 3, timeout=180)
        exports = {what: only for what, (only,) in _exports(tail, t.audit, study).items()}
        for what in OBJECTS:
            assert exports[what]["decision"] == f"{what}_stored", exports[what]
            assert exports[what]["detail"]["status"] == "0x0000"
        (finding,) = tail.of(t.findings, study_uid=study)
        assert finding["positive"], finding
        stored = _results_in_orthanc(orthanc, study)
        uid = {what: exports[what]["detail"]["sop_instance_uid"] for what in OBJECTS}
        assert set(stored) == set(uid.values())
        raw = {what: orthanc_file(orthanc, stored[uid[what]]) for what in OBJECTS}
        sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw["sr"])))
        assert sr.SOPClassUID == Comprehensive3DSRStorage and sr.StudyInstanceUID == study
        (group,) = sr.content.get_image_measurement_groups()
        (present,) = group.get_qualitative_evaluations()
        assert present.value == PRESENT
        (probability,) = group.get_measurements(name=PROBABILITY)
        assert float(probability.value) == pytest.approx(finding["probability"], abs=1e-6)
        # The references resolve to the instances Orthanc holds for the CT series...
        ct = {
            i["MainDicomTags"]["SOPInstanceUID"]
            for i in orthanc.rest("GET", f"/studies/{orthanc.study_id(study)}/instances")
            if i["MainDicomTags"]["SOPInstanceUID"] not in stored
        }
        (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
        (series_ref,) = evidence.ReferencedSeriesSequence
        assert {str(r.ReferencedSOPInstanceUID) for r in series_ref.ReferencedSOPSequence} == ct
        # ...and the bleed's slices are a non-empty subset of them.
        sliced = {str(img.referenced_sop_instance_uid) for img in group.source_images}
        assert sliced and sliced <= ct
        # The key image is drawn on one of those slices; the KOS flags the key image.
        key = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw["key_image"]))
        assert key.SOPClassUID == SecondaryCaptureImageStorage and key.BurnedInAnnotation == "YES"
        assert str(key.SourceImageSequence[0].ReferencedSOPInstanceUID) in sliced
        kos = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw["kos"]))
        images = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
        assert [str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in images] == [
            uid["key_image"]
        ]
        # An independent IOD validator on what Orthanc gives back.
        for what in OBJECTS:
            (tmp_path / f"{what}.dcm").write_bytes(raw[what])
            assert _dciodvfy_errors(tmp_path / f"{what}.dcm") == [], what

        # 2. Orthanc down: the export retries; back up, each object is stored, once.
        orthanc.stop()
        second, second_files = _send_bleed(settings, None, producer, tmp_path / "ct2", seed=1802)
        tail.until(lambda: tail.of(t.findings, study_uid=second), timeout=180)
        wait_until(lambda: "try 3 again" in worker.log_file.read_text(), "the export retrying", timeout=120)
        assert not _exports(tail, t.audit, second)
        orthanc.start()
        orthanc.upload(second_files)
        tail.until(lambda: len(_exports(tail, t.audit, second)) == 3, timeout=120)
        exports2 = {what: only for what, (only,) in _exports(tail, t.audit, second).items()}
        assert exports2["sr"]["decision"] == "sr_stored" and exports2["sr"]["detail"]["tries"] >= 3, exports2
        uid2 = {what: exports2[what]["detail"]["sop_instance_uid"] for what in OBJECTS}
        assert set(_results_in_orthanc(orthanc, second)) == set(uid2.values())

        # 3. The same finding again (a replay after a kill): the same instances, no second copy.
        (finding2,) = [r for r in tail.records if r.topic == t.findings and r.value["study_uid"] == second]
        producer.send(t.findings, key=second.encode(), value=finding2.raw).get(10)
        tail.until(lambda: all(len(v) == 2 for v in _exports(tail, t.audit, second).values()), timeout=120)
        for what, (_, again) in _exports(tail, t.audit, second).items():
            assert again["decision"] == f"{what}_stored"
            assert again["detail"]["sop_instance_uid"] == uid2[what]
        assert set(_results_in_orthanc(orthanc, second)) == set(uid2.values())
        assert set(_results_in_orthanc(orthanc, study)) == set(uid.values())
        assert not [d for d in tail.of(t.deadletter) if d["stage"] == "pacs-export"]
    finally:
        orthanc.stop()


def orthanc_file(orthanc: Orthanc, instance_id: str) -> bytes:
    """The instance's Part 10 file as Orthanc stored it (REST `/instances/{id}/file`)."""
    url = f"http://127.0.0.1:{orthanc.http_port}/instances/{instance_id}/file"
    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read())


def test_radtriage_own_sr_sent_back_is_not_ingested(listener: Listener, tmp_path: Path) -> None:
    study, files, sources = _small_ct(tmp_path / "ct", 4)
    finding = ich_result(study, str(sources[0].SeriesInstanceUID))
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(encode(build_sr(finding, sources)))
    sr_uid = str(pydicom.dcmread(sr_path).SOPInstanceUID)

    # The PACS forwards the whole study back, our SR first: the SR gets success (the PACS
    # must not retry it) and is neither stored nor published; the CT goes through.
    # -R: a context for the file's own SOP class (storescu's default list lacks 3D SR).
    out = storescu(
        "-v", "-R", "-aec", listener.settings.dicom.ae_title, "127.0.0.1", str(listener.port), str(sr_path)
    )
    assert out.returncode == 0 and "Received Store Response (Success)" in out.stdout + out.stderr, out.stderr
    out = send_files(listener, files)
    assert out.returncode == 0, out.stderr
    records = read_topic(listener.settings.kafka.bootstrap_servers, listener.topic, len(files) + 1)
    events = [r.value for r in records if r.value["study_uid"] == study]
    instances = [e["sop_instance_uid"] for e in events if e["kind"] == "instance"]
    assert len(instances) == len(files) and sr_uid not in instances
    markers = [e for e in events if e["kind"] == "transfer_complete"]
    assert [m["instance_count"] for m in markers] == [len(files)]
    assert not list(listener.settings.blob_dir.rglob(f"{sr_uid}.dcm"))


@pytest.fixture
def stow_intake(kafka_bootstrap: str, tmp_path: Path, loop: asyncio.AbstractEventLoop) -> Iterator[Intake]:
    """The HTTP intake (DICOMweb STOW-RS) in this process, on an `imaging.instances` of its own."""
    with running_intake(http_settings(tmp_path / "home", kafka_bootstrap, ("instances",)), loop) as intake:
        yield intake


def test_radtriage_own_sr_stowed_back_is_answered_stored_and_not_ingested(
    stow_intake: Intake, tmp_path: Path
) -> None:
    study, files, sources = _small_ct(tmp_path / "ct", 3)
    finding = ich_result(study, str(sources[0].SeriesInstanceUID))
    sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(encode(build_sr(finding, sources))))
    client = DICOMwebClient(url=f"{stow_intake.base}/dicomweb")

    response = client.store_instances([sr, *(pydicom.dcmread(f) for f in files)])

    # Answered stored, all four: a PACS told otherwise would send the SR again.
    assert "FailedSOPSequence" not in response
    assert len(response.ReferencedSOPSequence) == len(files) + 1
    records = read_topic(stow_intake.settings.kafka.bootstrap_servers, stow_intake.topic, len(files) + 1)
    instances = [r.value["sop_instance_uid"] for r in records if r.value["kind"] == "instance"]
    assert len(instances) == len(files) and str(sr.SOPInstanceUID) not in instances
    (marker,) = [r.value for r in records if r.value["kind"] == "transfer_complete"]
    assert marker["instance_count"] == len(files)
    assert not list(stow_intake.settings.blob_dir.rglob(f"{sr.SOPInstanceUID}.dcm"))


def test_a_later_better_series_sends_an_amended_sr_referencing_the_first(
    worker_env: tuple[dict[str, str], Settings], triton_grpc_url: str, tmp_path: Path
) -> None:
    """The thin series is read first and its SR sent; the 5 mm series the rule prefers
    arrives later, is read again, and its SR names the first as its predecessor."""
    env, settings = worker_env
    t = settings.topics
    orthanc = Orthanc(tmp_path / "pacs")
    orthanc.start()
    try:
        study = f"1.2.826.0.9.{time.time_ns()}"
        phantom = head_ct_phantom(np.random.default_rng(7007), bleed=True, min_bleed_ml=5.0)
        dz, dy, dx = phantom.spacing_zyx
        kw = {"study_uid": study, "body_part": "HEAD"}
        thin = write_ct_series(
            np.repeat(phantom.hu, 2, axis=0),
            (dz / 2, dy, dx),
            tmp_path / "thin",
            series_uid=study + ".3",
            **kw,
        )
        thick = write_ct_series(
            phantom.hu, phantom.spacing_zyx, tmp_path / "thick", series_uid=study + ".2", **kw
        )
        orthanc.upload(thin + thick)
        _, tail, producer = _start_worker(env, settings, _orthanc_destination(orthanc), triton_grpc_url)
        send_series(producer, settings, thin, study, THIN, dz / 2)
        tail.until(lambda: len(_exports(tail, t.audit, study).get("sr", [])) == 1, timeout=180)
        send_series(producer, settings, thick, study, THICK, dz)
        tail.until(lambda: len(_exports(tail, t.audit, study).get("sr", [])) == 2, timeout=180)

        first, second = tail.of(t.findings, study_uid=study)
        assert second["amends_request_id"] == first["request_id"]
        sent = [e["detail"]["sop_instance_uid"] for e in _exports(tail, t.audit, study)["sr"]]
        assert all(e["decision"] == "sr_stored" for e in _exports(tail, t.audit, study)["sr"])
        stored = _results_in_orthanc(orthanc, study)
        assert set(stored) == set(sent) and len(set(sent)) == 2
        amended = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc_file(orthanc, stored[sent[1]])))
        (predecessor_study,) = amended.PredecessorDocumentsSequence
        (predecessor_series,) = predecessor_study.ReferencedSeriesSequence
        (predecessor,) = predecessor_series.ReferencedSOPSequence
        assert predecessor.ReferencedSOPInstanceUID == sent[0]
        original = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc_file(orthanc, stored[sent[0]])))
        assert predecessor_series.SeriesInstanceUID == original.SeriesInstanceUID
        assert "PredecessorDocumentsSequence" not in original
        # Each SR references the series it was read on.
        for sr, series in ((original, study + ".3"), (amended, study + ".2")):
            (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
            assert [s.SeriesInstanceUID for s in evidence.ReferencedSeriesSequence] == [series]
        (tmp_path / "amended.dcm").write_bytes(orthanc_file(orthanc, stored[sent[1]]))
        assert _dciodvfy_errors(tmp_path / "amended.dcm") == []
    finally:
        orthanc.stop()


def test_a_pacs_that_stays_down_past_the_deadline_gets_a_dead_letter_naming_it(
    worker_env: tuple[dict[str, str], Settings], tmp_path: Path
) -> None:
    """No Triton: a finding is published as the lane would; the destination's port has no
    listener, so every try fails, and after the deadline the finding is dead-lettered with
    the destination and the status, and audited as not stored. A finding whose series is
    not in the blob store is dead-lettered with that cause."""
    env, settings = worker_env
    t = settings.topics
    down_port = free_port()
    destination = {"name": "gone", "host": "127.0.0.1", "port": down_port, "ae_title": "NOPACS"}
    study, files, sources = _small_ct(tmp_path / "ct", 4)
    series = str(sources[0].SeriesInstanceUID)
    blobs = LocalBlobStore(settings.blob_dir)
    for path, ds in zip(files, sources, strict=True):
        blobs.put_instance(study, series, str(ds.SOPInstanceUID), path.read_bytes())
    finding = ich_result(study, series)
    orphan = finding.model_copy(update={"study_uid": pydicom.uid.generate_uid(), "request_id": "orphan"})
    _, tail, producer = _start_worker(
        env, settings, destination, retry_initial_s="0.2", retry_max_s="0.5", retry_deadline_s="2"
    )
    for f in (finding, orphan):
        producer.send(t.findings, key=f.study_uid.encode(), value=f.to_bytes()).get(10)

    def letters(uid: str) -> list[dict[str, Any]]:
        return [d for d in tail.of(t.deadletter, study_uid=uid) if d["stage"] == "pacs-export"]

    tail.until(lambda: letters(study) and letters(orphan.study_uid), timeout=120)
    (letter,) = letters(study)
    assert f"destination gone (NOPACS@127.0.0.1:{down_port})" in letter["error"]
    assert "DICOM status no response" in letter["error"] and "association" in letter["error"]
    assert Finding.from_bytes(letter["payload"]) == finding  # replayable as it was
    (export,) = _exports(tail, t.audit, study)["sr"]
    assert export["decision"] == "sr_failed" and export["detail"]["tries"] > 1
    (orphan_letter,) = letters(orphan.study_uid)
    assert "no source instance" in orphan_letter["error"]


def test_dicom_tls_to_the_pacs(tmp_path: Path) -> None:
    """Orthanc on DICOM TLS asking for a client certificate: the SR goes through with
    radtriage's certificate; plain TCP, a PACS certificate of an untrusted CA, or no client
    certificate do not store it, and each is a retryable outcome (no response)."""
    pki = make_pki(tmp_path / "pki")
    orthanc = Orthanc(
        tmp_path / "pacs",
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.server_cert),
            "DicomTlsPrivateKey": str(pki.server_key),
            "DicomTlsTrustedCertificates": str(pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    orthanc.start()
    try:
        study, _, sources = _small_ct(tmp_path / "ct", 3)
        finding = ich_result(study, str(sources[0].SeriesInstanceUID))
        sr = build_sr(finding, sources)
        base = {"name": "tls", "host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": orthanc.aet}
        mutual = DestinationTls(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
        refused = {
            "plain": DicomDestination.model_validate(base),
            "untrusted PACS": DicomDestination.model_validate(
                base
                | {
                    "tls": DestinationTls(
                        ca_file=pki.other_ca, cert_file=pki.client_cert, key_file=pki.client_key
                    )
                }
            ),
            "no client certificate": DicomDestination.model_validate(
                base | {"tls": DestinationTls(ca_file=pki.ca)}
            ),
        }
        for why, destination in refused.items():
            outcome = c_store(destination, sr, 5.0)
            assert not outcome.stored and outcome.retryable, (why, outcome)
        assert orthanc.instance_count() == 0

        outcome = c_store(DicomDestination.model_validate(base | {"tls": mutual}), sr, 10.0)
        assert outcome.stored, outcome
        (found,) = orthanc.rest("POST", "/tools/lookup", str(sr.SOPInstanceUID))
        assert found["Type"] == "Instance"
    finally:
        orthanc.stop()


def _send_chest_nodule(
    settings: Settings, orthanc: Orthanc, producer: KafkaProducer, work: Path
) -> tuple[str, list[Path]]:
    """The demo's chest CT with one solid nodule (radtriage/demo.py), in Orthanc and the blob
    store, and its routine-lane request for the lung-nodule rule."""
    from models.nodule_detector.phantoms import chest_ct_phantom
    from radtriage.demo import NODULE_MIN_MM, NODULE_SEED

    phantom = chest_ct_phantom(
        np.random.default_rng(NODULE_SEED), nodules=1, kinds=("solid",), min_diameter_mm=NODULE_MIN_MM
    )
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = write_ct_series(
        phantom.hu, phantom.spacing_zyx, work, study_uid=study, series_uid=series, body_part="CHEST"
    )
    orthanc.upload(files)
    blobs = LocalBlobStore(settings.blob_dir)
    uris = tuple(
        blobs.put_instance(
            study, series, str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), f.read_bytes()
        )
        for f in files
    )
    rule_id = "ct-chest-lung-nodule"
    (rule,) = [r for r in RoutingRules.load(settings.routing_rules).rules if r.id == rule_id]
    now = datetime.now(UTC)
    request = TriageRequest(
        study_uid=study,
        series_uid=series,
        instance_uris=uris,
        lane="routine",
        rule_id=rule_id,
        model_name=rule.model,
        finding=rule.finding,
        threshold=rule.threshold,
        received_at=now,
        ready_at=now,
        request_id=f"{study}/{rule_id}",
    )
    producer.send(settings.topics.lane_topic("routine"), key=study.encode(), value=request.to_bytes()).get(10)
    return study, files


def _frames_lps(seg: hd.seg.Segmentation, segment: int) -> np.ndarray:
    """(n, 3) patient coordinates (mm) of the pixels of one segment, over every frame."""
    points = []
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    dy, dx = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        # With one segment, highdicom names it once for all frames (shared groups).
        which = item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        if int(which[0].ReferencedSegmentNumber) != segment:
            continue
        origin = np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        rows, cols = np.nonzero(frame)
        points.append(origin + cols[:, None] * dx * orientation[:3] + rows[:, None] * dy * orientation[3:])
    return np.concatenate(points) if points else np.zeros((0, 3))


def test_a_bleed_and_a_chest_nodule_end_as_segs_on_their_ct_in_orthanc(
    worker_env: tuple[dict[str, str], Settings], triton_grpc_url: str, tmp_path: Path
) -> None:
    """The bleed's SEG covers the slices of its slice range and references the CT's
    instances; the nodule's SEG has a sphere where the SR's SCOORD3D point is."""
    env, settings = worker_env
    t = settings.topics
    orthanc = Orthanc(tmp_path / "pacs")
    orthanc.start()
    try:
        destination = _orthanc_destination(orthanc, objects=["sr", "seg"], positive_only=True)
        _, tail, producer = _start_worker(env, settings, destination, triton_grpc_url)
        bleed, bleed_files = _send_bleed(settings, orthanc, producer, tmp_path / "ct", seed=1801)
        chest, chest_files = _send_chest_nodule(settings, orthanc, producer, tmp_path / "chest")
        for study in (bleed, chest):
            tail.until(lambda s=study: len(_exports(tail, t.audit, s)) == 2, timeout=240)

        # The bleed.
        (finding,) = tail.of(t.findings, study_uid=bleed)
        assert finding["positive"] and finding["slice_range"] and finding["localisation_map_uri"], finding
        exports = {what: only for what, (only,) in _exports(tail, t.audit, bleed).items()}
        assert exports["seg"]["decision"] == "seg_stored", exports["seg"]
        stored = _results_in_orthanc(orthanc, bleed)
        raw = orthanc_file(orthanc, stored[exports["seg"]["detail"]["sop_instance_uid"]])
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw)))
        ct = {str(ds.SOPInstanceUID): ds for ds in read_headers(bleed_files)}
        assert seg.StudyInstanceUID == bleed
        assert seg.FrameOfReferenceUID == next(iter(ct.values())).FrameOfReferenceUID
        frames_z = sorted(
            float(f.PlanePositionSequence[0].ImagePositionPatient[2])
            for f in seg.PerFrameFunctionalGroupsSequence
        )
        bleed_range = finding["slice_range"]
        # The frames are on the bleed's slices, the first and last exactly on its ends.
        assert frames_z[0] == pytest.approx(bleed_range["first_position_mm"], abs=0.01)
        assert frames_z[-1] == pytest.approx(bleed_range["last_position_mm"], abs=0.01)
        # Its references resolve to CT instances that were sent and that Orthanc holds.
        (series_ref,) = seg.ReferencedSeriesSequence
        referenced = {str(r.ReferencedSOPInstanceUID) for r in series_ref.ReferencedInstanceSequence}
        in_orthanc = {
            i["MainDicomTags"]["SOPInstanceUID"]
            for i in orthanc.rest("GET", f"/studies/{orthanc.study_id(bleed)}/instances")
        }
        assert referenced and referenced <= set(ct) and referenced <= in_orthanc
        assert sorted(float(ct[uid].ImagePositionPatient[2]) for uid in referenced) == pytest.approx(frames_z)
        (tmp_path / "bleed-seg.dcm").write_bytes(raw)
        assert _dciodvfy_errors(tmp_path / "bleed-seg.dcm") == []

        # The nodule: a sphere segment per nodule, centred on the SR's SCOORD3D point.
        (nodule_finding,) = tail.of(t.findings, study_uid=chest)
        assert nodule_finding["positive"] and nodule_finding["nodules"], nodule_finding
        exports = {what: only for what, (only,) in _exports(tail, t.audit, chest).items()}
        stored = _results_in_orthanc(orthanc, chest)
        raw_seg = orthanc_file(orthanc, stored[exports["seg"]["detail"]["sop_instance_uid"]])
        raw_sr = orthanc_file(orthanc, stored[exports["sr"]["detail"]["sop_instance_uid"]])
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw_seg)))
        sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw_sr)))
        assert len(seg.SegmentSequence) == len(nodule_finding["nodules"])
        (first_group, *_) = sr.content.get_planar_roi_measurement_groups()
        point = np.array(first_group.roi.value, dtype=float).reshape(3)
        nodule = nodule_finding["nodules"][0]
        assert point == pytest.approx(nodule["centre_lps_mm"], abs=0.01)
        sphere = _frames_lps(seg, 1)
        spacing = next(iter(read_headers(chest_files[:1]))).PixelSpacing
        # Centred on the point: in-plane within a pixel, along z within half a slice (5 mm).
        assert np.abs(sphere.mean(axis=0)[:2] - point[:2]).max() <= float(spacing[0])
        assert abs(sphere.mean(axis=0)[2] - point[2]) <= 2.5
        # As wide as the nodule: its widest frame is at most half a slice (2.5 mm) off its
        # equator, and pixel centres lose up to a pixel at each side.
        widest = max(np.ptp(sphere[np.isclose(sphere[:, 2], z), 0]) for z in np.unique(sphere[:, 2]))
        radius, pixel = nodule["diameter_mm"] / 2, float(spacing[1])
        assert 2 * np.sqrt(radius**2 - 2.5**2) - 2 * pixel <= widest <= 2 * radius
        assert str(seg.SegmentSequence[0].TrackingUID) == str(first_group.tracking_uid)
        (tmp_path / "nodule-seg.dcm").write_bytes(raw_seg)
        assert _dciodvfy_errors(tmp_path / "nodule-seg.dcm") == []
        assert not [d for d in tail.of(t.deadletter) if d["stage"] == "pacs-export"]
    finally:
        orthanc.stop()
