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
from collections.abc import Iterator
from contextlib import contextmanager
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
from radtriage.settings import DestinationTls, DicomDestination, Settings
from schemas.findings import Finding
from streams.dicom_send import c_store
from tests.certs import make_pki
from tests.integration.harness import RULE, Worker, send_request, store_series
from tests.support.dicom import Listener, send_files, storescu
from tests.support.findings import ich_result
from tests.support.http import Intake, http_settings, running_intake
from tests.support.kafka import Tail, read_topic
from tests.support.net import free_port
from tests.support.orthanc import Orthanc
from tests.support.process import run_replay
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
    uris = store_series(settings, study, series, files)
    send_request(settings, producer, "stat", RULE, study, series, uris, patient_id=f"MRN{seed}")
    return study, files


def _results_in_orthanc(orthanc: Orthanc, study_uid: str) -> dict[str, str]:
    """SOP Instance UID -> Orthanc id of radtriage's objects (their UIDs are 2.25.*) in the study."""
    instances: list[dict[str, Any]] = orthanc.rest("GET", f"/studies/{orthanc.study_id(study_uid)}/instances")
    uids = {i["MainDicomTags"].get("SOPInstanceUID", ""): i["ID"] for i in instances}
    return {uid: oid for uid, oid in uids.items() if uid.startswith("2.25.")}


def _exports(
    tail: Tail, audit_topic: str, study: str, *, retrying: bool = False, destination: str = ""
) -> dict[str, list[dict[str, Any]]]:
    """The export audit events of a study, by object (sr, key_image, kos): the outcomes
    (stored, failed), or with `retrying` the first-retry events; of one destination if named."""
    found: dict[str, list[dict[str, Any]]] = {}
    for a in tail.of(audit_topic, study_uid=study):
        if a["stage"] != "export" or a["decision"].endswith("_retrying") != retrying:
            continue
        if destination and a["detail"]["destination"] != destination:
            continue
        found.setdefault(a["detail"]["object"], []).append(a)
    return found


def _letters(tail: Tail, deadletter_topic: str, study: str) -> list[dict[str, Any]]:
    """The study's dead letters of the export stage."""
    return [d for d in tail.of(deadletter_topic, study_uid=study) if d["stage"] == "pacs-export"]


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


@contextmanager
def _running_orthanc(where: Path, **options: Any) -> Iterator[Orthanc]:
    """Orthanc (`options` as Orthanc takes them) started, and stopped whatever the test does."""
    orthanc = Orthanc(where, **options)
    orthanc.start()
    try:
        yield orthanc
    finally:
        orthanc.stop()


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
    destination: dict[str, Any] | list[dict[str, Any]],
    triton_grpc_url: str | None = None,
    **dispatch: str,
) -> tuple[Worker, Tail, KafkaProducer]:
    """A worker exporting to `destination` (or each of a list; with Triton when its URL is
    given; `dispatch` sets the other RADTRIAGE_DISPATCH__* settings), a tail of the
    findings, audit and dead letters, and a producer to feed it."""
    if triton_grpc_url is not None:
        env["RADTRIAGE_TRITON__GRPC_URL"] = triton_grpc_url
        env["RADTRIAGE_TRITON__TIMEOUT_S"] = "30"
    destinations = destination if isinstance(destination, list) else [destination]
    env["RADTRIAGE_DISPATCH__DESTINATIONS"] = json.dumps(destinations)
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
    with _running_orthanc(tmp_path / "pacs") as orthanc:
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
        raw = {what: orthanc.file(stored[uid[what]]) for what in OBJECTS}
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
        (retried,) = _exports(tail, t.audit, second, retrying=True)["sr"]
        assert retried["detail"]["status"] == "no response"
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
    with _running_orthanc(tmp_path / "pacs") as orthanc:
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
        assert _exports(tail, t.audit, study)["sr"][1]["detail"]["amends_request_id"] == first["request_id"]
        stored = _results_in_orthanc(orthanc, study)
        assert set(stored) == set(sent) and len(set(sent)) == 2
        amended = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.file(stored[sent[1]])))
        (predecessor_study,) = amended.PredecessorDocumentsSequence
        (predecessor_series,) = predecessor_study.ReferencedSeriesSequence
        (predecessor,) = predecessor_series.ReferencedSOPSequence
        assert predecessor.ReferencedSOPInstanceUID == sent[0]
        original = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.file(stored[sent[0]])))
        assert predecessor_series.SeriesInstanceUID == original.SeriesInstanceUID
        assert "PredecessorDocumentsSequence" not in original
        # Each SR references the series it was read on.
        for sr, series in ((original, study + ".3"), (amended, study + ".2")):
            (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
            assert [s.SeriesInstanceUID for s in evidence.ReferencedSeriesSequence] == [series]
        (tmp_path / "amended.dcm").write_bytes(orthanc.file(stored[sent[1]]))
        assert _dciodvfy_errors(tmp_path / "amended.dcm") == []


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
    finding, _ = _finding_on_a_stored_series(settings, tmp_path / "ct")
    study = finding.study_uid
    orphan = finding.model_copy(update={"study_uid": pydicom.uid.generate_uid(), "request_id": "orphan"})
    _, tail, producer = _start_worker(
        env, settings, destination, retry_initial_s="0.2", retry_max_s="0.5", retry_deadline_s="2"
    )
    for f in (finding, orphan):
        producer.send(t.findings, key=f.study_uid.encode(), value=f.to_bytes()).get(10)

    tail.until(
        lambda: _letters(tail, t.deadletter, study) and _letters(tail, t.deadletter, orphan.study_uid),
        timeout=120,
    )
    (letter,) = _letters(tail, t.deadletter, study)
    assert f"destination gone (NOPACS@127.0.0.1:{down_port})" in letter["error"]
    assert "DICOM status no response" in letter["error"] and "association" in letter["error"]
    assert Finding.from_bytes(letter["payload"]) == finding  # replayable as it was
    (export,) = _exports(tail, t.audit, study)["sr"]
    assert export["decision"] == "sr_failed" and export["detail"]["tries"] > 1
    (orphan_letter,) = _letters(tail, t.deadletter, orphan.study_uid)
    assert "no source instance" in orphan_letter["error"]


def test_dicom_tls_to_the_pacs(tmp_path: Path) -> None:
    """Orthanc on DICOM TLS asking for a client certificate: the SR goes through with
    radtriage's certificate; plain TCP, a PACS certificate of an untrusted CA, or no client
    certificate do not store it, and each is a retryable outcome (no response)."""
    pki = make_pki(tmp_path / "pki")
    with _running_orthanc(
        tmp_path / "pacs",
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.server_cert),
            "DicomTlsPrivateKey": str(pki.server_key),
            "DicomTlsTrustedCertificates": str(pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
        },
    ) as orthanc:
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


def _finding_on_a_stored_series(settings: Settings, work: Path) -> tuple[Finding, list[Path]]:
    """A positive ICH finding (as the stat lane would publish it) on a small CT of a new
    study that is in the worker's blob store, and the CT's files."""
    study, files, sources = _small_ct(work, 4)
    series = str(sources[0].SeriesInstanceUID)
    store_series(settings, study, series, files)
    return ich_result(study, series), files


def _study_instances(orthanc: Orthanc, study: str) -> list[str]:
    """Every SOP Instance UID Orthanc holds in the study (a second copy would be listed twice)."""
    instances = orthanc.rest("GET", f"/studies/{orthanc.study_id(study)}/instances")
    return [i["MainDicomTags"]["SOPInstanceUID"] for i in instances]


# Two retry policies (RADTRIAGE_DISPATCH__* settings) for an outage of ~20 s: one rides it
# out (tries every 1-4 s for up to 60 s), one gives up on it (0.5-1 s for up to 3 s).
RIDES_OUT = {"retry_initial_s": "1", "retry_max_s": "4", "retry_deadline_s": "60", "timeout_s": "5"}
GIVES_UP = {"retry_initial_s": "0.5", "retry_max_s": "1", "retry_deadline_s": "3", "timeout_s": "2"}


def _sent_with_orthanc_down(
    env: dict[str, str], settings: Settings, orthanc: Orthanc, work: Path, **retry: str
) -> tuple[Finding, list[Path], Tail]:
    """A finding on a CT that Orthanc holds, a worker exporting SR, key image and KOS there
    (`retry`: the RADTRIAGE_DISPATCH__* settings), then Orthanc stopped and the finding sent."""
    finding, files = _finding_on_a_stored_series(settings, work)
    orthanc.upload(files)
    _, tail, producer = _start_worker(
        env, settings, _orthanc_destination(orthanc, objects=list(OBJECTS)), **retry
    )
    orthanc.stop()
    producer.send(settings.topics.findings, key=finding.study_uid.encode(), value=finding.to_bytes()).get(10)
    return finding, files, tail


def test_orthanc_down_and_back_within_the_deadline_loses_nothing_and_duplicates_nothing(
    worker_env: tuple[dict[str, str], Settings], tmp_path: Path
) -> None:
    """Orthanc stopped, a bleed finding produced, Orthanc back after an outage shorter than
    `retry_deadline_s` (60 s here; the real figure is the setting, 600 s by default): the
    SR is audited as retrying, then SR, key image and KOS stored, each exactly once."""
    env, settings = worker_env
    t = settings.topics
    with _running_orthanc(tmp_path / "pacs") as orthanc:
        finding, files, tail = _sent_with_orthanc_down(env, settings, orthanc, tmp_path / "ct", **RIDES_OUT)
        down_at = time.monotonic()  # a moment after it stopped: the outage is no shorter
        study = finding.study_uid
        tail.until(lambda: _exports(tail, t.audit, study, retrying=True).get("sr"), timeout=60)
        assert not _exports(tail, t.audit, study)  # nothing stored nor given up on yet
        # The outage lasts ~20 s of retries; then the PACS is back, same storage and ports.
        time.sleep(max(0.0, 20.0 - (time.monotonic() - down_at)))
        orthanc.start()
        tail.until(lambda: len(_exports(tail, t.audit, study)) == 3, timeout=90)

        decisions = [a["decision"] for a in tail.of(t.audit, study_uid=study) if a["stage"] == "export"]
        assert decisions == ["sr_retrying", "sr_stored", "key_image_stored", "kos_stored"], decisions
        exports = {what: only for what, (only,) in _exports(tail, t.audit, study).items()}
        assert exports["sr"]["detail"]["tries"] > 1 and exports["sr"]["detail"]["status"] == "0x0000"
        sent = {exports[what]["detail"]["sop_instance_uid"] for what in OBJECTS}
        held = _study_instances(orthanc, study)
        # Exactly one instance per object, beside the CT's own.
        assert len(held) == len(set(held)) == len(files) + len(OBJECTS)
        assert set(_results_in_orthanc(orthanc, study)) == sent
        assert not [d for d in tail.of(t.deadletter) if d["stage"].startswith("pacs-export")]


def test_past_the_deadline_a_dead_letter_and_a_replay_sends_each_object_once(
    worker_env: tuple[dict[str, str], Settings], tmp_path: Path
) -> None:
    """Orthanc down past `retry_deadline_s`: the finding is dead-lettered naming the
    destination and the status, with the outbox as its source; Orthanc back, `radtriage
    replay --stage pacs-export` resends it there and the objects arrive once; a second
    replay sends nothing."""
    env, settings = worker_env
    t = settings.topics
    with _running_orthanc(tmp_path / "pacs") as orthanc:
        finding, files, tail = _sent_with_orthanc_down(env, settings, orthanc, tmp_path / "ct", **GIVES_UP)
        study = finding.study_uid

        tail.until(lambda: _letters(tail, t.deadletter, study), timeout=90)
        (letter,) = _letters(tail, t.deadletter, study)
        assert f"destination orthanc (ORTHANC@127.0.0.1:{orthanc.dicom_port})" in letter["error"]
        assert "sr not stored" in letter["error"] and "DICOM status no response" in letter["error"]
        assert letter["source_topic"] == settings.streams.outbox_topic("pacs-export")
        assert Finding.from_bytes(letter["payload"]) == finding
        (failed,) = _exports(tail, t.audit, study)["sr"]
        assert failed["decision"] == "sr_failed"

        orthanc.start()
        assert _results_in_orthanc(orthanc, study) == {}
        replayed = run_replay(env, "--stage", "pacs-export")
        assert replayed.returncode == 0 and "replayed" in replayed.stdout, replayed.stdout + replayed.stderr
        tail.until(lambda: all(what in _exports(tail, t.audit, study) for what in OBJECTS), timeout=90)
        exports = _exports(tail, t.audit, study)
        assert [a["decision"] for a in exports["sr"]] == ["sr_failed", "sr_stored"]
        assert [a["decision"] for a in exports["key_image"]] == ["key_image_stored"]
        assert [a["decision"] for a in exports["kos"]] == ["kos_stored"]
        again = run_replay(env, "--stage", "pacs-export")
        assert again.returncode == 0 and "already replayed" in again.stdout, again.stdout
        held = _study_instances(orthanc, study)
        assert len(held) == len(set(held)) == len(files) + len(OBJECTS)
        assert set(_results_in_orthanc(orthanc, study)) == {
            exports[w][-1]["detail"]["sop_instance_uid"] for w in OBJECTS
        }
        # The replay went to the outbox only: report and escalate did not see the finding again.
        assert len(tail.of(t.findings, study_uid=study)) == 1


def test_stow_rs_to_orthanc_dicomweb_with_basic_auth(
    worker_env: tuple[dict[str, str], Settings], tmp_path: Path
) -> None:
    """Orthanc's DICOMweb plugin (Debian orthanc-dicomweb) behind HTTP basic auth as a STOW-RS
    destination: SR, key image and KOS stored there; a second destination with a wrong
    password is refused at once (401, final: no retry) and dead-lettered naming it."""
    env, settings = worker_env
    t = settings.topics
    with _running_orthanc(tmp_path / "pacs", dicomweb=True, users={"radtriage": "s3cret"}) as orthanc:
        finding, _ = _finding_on_a_stored_series(settings, tmp_path / "ct")
        study = finding.study_uid
        web = {"kind": "stow", "url": orthanc.dicomweb_url, "username": "radtriage", "objects": list(OBJECTS)}
        destinations = [
            {"name": "web", **web, "password": "s3cret"},
            {"name": "wrong-password", **web, "password": "nope"},
        ]
        _, tail, producer = _start_worker(env, settings, destinations, retry_deadline_s="60", timeout_s="10")
        producer.send(t.findings, key=study.encode(), value=finding.to_bytes()).get(10)

        tail.until(lambda: _letters(tail, t.deadletter, study), timeout=90)
        stored = {w: only for w, (only,) in _exports(tail, t.audit, study, destination="web").items()}
        assert set(stored) == set(OBJECTS)
        for what, event in stored.items():
            assert event["decision"] == f"{what}_stored" and event["detail"]["status"] == "HTTP 200", event
            assert event["detail"]["kind"] == "stow" and event["detail"]["where"] == orthanc.dicomweb_url
        held = _results_in_orthanc(orthanc, study)
        assert set(held) == {stored[w]["detail"]["sop_instance_uid"] for w in OBJECTS}
        classes = {
            orthanc.rest("GET", f"/instances/{oid}/simplified-tags")["SOPClassUID"] for oid in held.values()
        }
        assert Comprehensive3DSRStorage in classes and SecondaryCaptureImageStorage in classes

        (letter,) = _letters(tail, t.deadletter, study)
        assert f"destination wrong-password ({orthanc.dicomweb_url})" in letter["error"]
        assert "STOW status HTTP 401" in letter["error"] and "after 1 tries" in letter["error"]
        (refused,) = _exports(tail, t.audit, study, destination="wrong-password")["sr"]
        assert refused["decision"] == "sr_failed" and refused["detail"]["tries"] == 1
        assert not _exports(tail, t.audit, study, destination="wrong-password", retrying=True)


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
    uris = store_series(settings, study, series, files)
    send_request(settings, producer, "routine", "ct-chest-lung-nodule", study, series, uris)
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
    with _running_orthanc(tmp_path / "pacs") as orthanc:
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
        raw = orthanc.file(stored[exports["seg"]["detail"]["sop_instance_uid"]])
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
        raw_seg = orthanc.file(stored[exports["seg"]["detail"]["sop_instance_uid"]])
        raw_sr = orthanc.file(stored[exports["sr"]["detail"]["sop_instance_uid"]])
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
