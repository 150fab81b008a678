"""End to end, as a user runs it: `radtriage up` (embedded Kafka + Triton), studies sent
with dcmtk's `storescu`, outcomes read back from Kafka, Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from models.dicom_writer import write_ct_series
from models.phantoms import chest_ct_phantom
from tests.e2e.harness import Outputs, Stack, _consumers
from tests.support.dicom import storescu_send
from tests.support.dicom_objects import instance, with_meta
from tests.support.head_study import head_ct_study

pytestmark = pytest.mark.e2e


def _write_head(tmp: Path, bleed: bool, seed: int) -> tuple[str, list[Path]]:
    return head_ct_study(
        tmp,
        seed,
        f"E2E{seed}",
        bleed=bleed,
        patient_id=f"MRN{seed}",
        patient_name="Test^Phantom",
        shuffle_files=True,
    )


def _storescu_send(stack: Stack, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return storescu_send(stack.dicom_port, files, calling="E2E_SCU")


def test_bleed_raises_one_alert_and_normal_gets_a_report_only(stack: Stack, tmp_path: Path) -> None:
    out = Outputs(stack.bootstrap)
    bleed_uid, bleed_files = _write_head(tmp_path / "bleed", True, 101)
    normal_uid, normal_files = _write_head(tmp_path / "normal", False, 102)
    for files in (bleed_files, normal_files):
        sent = _storescu_send(stack, files)
        assert sent.returncode == 0, sent.stderr

    out.poll_until(
        lambda: (
            out.of("triage.results.fhir", bleed_uid)
            and out.of("triage.results.fhir", normal_uid)
            and out.of("triage.alerts.ich", bleed_uid)
        )
    )
    out.drain(3.0)  # a duplicate alert, or one for the normal study, would arrive now

    alerts = out.of("triage.alerts.ich", bleed_uid)
    assert len(alerts) == 1, alerts
    assert alerts[0]["finding"] == "ICH" and alerts[0]["probability"] >= alerts[0]["threshold"]
    assert alerts[0]["trace_id"] and alerts[0]["model_name"] == "ich_classifier"
    assert out.of("triage.alerts.ich", normal_uid) == []

    for uid, positive in ((bleed_uid, True), (normal_uid, False)):
        (result,) = out.of("triage.results.fhir", uid)
        Bundle.model_validate(result["bundle"])
        report = DiagnosticReport.model_validate(result["bundle"]["entry"][0]["resource"])
        assert report.imagingStudy[0].identifier.value == f"urn:oid:{uid}"
        assert report.status == "preliminary"
        assert ("Suspected" in report.conclusion) is positive

    # One trace per study: the alert's trace id is the study's trace from the DICOM receive on.
    alert_headers = [h for t, d, h in out.seen if t == "triage.alerts.ich" and d["study_uid"] == bleed_uid]
    assert alert_headers[0]["traceparent"].decode().split("-")[1] == alerts[0]["trace_id"]
    study_headers = [h for t, d, h in out.seen if t == "imaging.studies" and d["study_uid"] == bleed_uid]
    assert study_headers[0]["traceparent"].decode().split("-")[1] == alerts[0]["trace_id"]


def test_a_study_no_rule_takes_is_reported_unrouted(stack: Stack, tmp_path: Path) -> None:
    out = Outputs(stack.bootstrap)
    # No rule reads an abdominal CT (routing looks at the headers, never the pixels).
    ph = chest_ct_phantom(np.random.default_rng(7))
    files = write_ct_series(
        ph.hu,
        ph.spacing_zyx,
        tmp_path,
        accession="E2EABDO",
        patient_id="MRN7",
        patient_name="Test^Abdomen",
        body_part="ABDOMEN",
        series_description="CT ABDOMEN PELVIS WO CONTRAST",
    )
    uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert _storescu_send(stack, files).returncode == 0
    out.poll_until(lambda: any(d["decision"] == "unrouted" for d in out.of("triage.audit", uid)))
    out.drain(2.0)
    assert out.of("triage.results.fhir", uid) == [] and out.of("triage.alerts.ich", uid) == []


def _corrupt_file(path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    # A valid Part 10 preamble and meta header followed by garbage where the dataset should be.
    with path.open("ab") as fh:
        fh.write(b"\x08\x00\x18\x00UI\xff\xff" + os.urandom(512))
    return path


def _non_image_file(path: Path) -> Path:
    ds = instance(CTImageStorage, "CT")  # claims CT, carries no pixels
    with_meta(ds).save_as(path, enforce_file_format=True)
    return path


def test_bad_objects_get_failure_statuses_and_the_next_good_study_is_processed(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunked mode sends the files' bytes as they are, without pynetdicom parsing them.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="E2E_BAD")
    # The files' own transfer syntax only: chunked sending cannot convert.
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    statuses = []
    for bad in (_corrupt_file(tmp_path / "corrupt.dcm"), _non_image_file(tmp_path / "noimage.dcm")):
        assoc = ae.associate("127.0.0.1", stack.dicom_port, ae_title="RADTRIAGE")
        assert assoc.is_established
        status = assoc.send_c_store(bad)  # sent as stored, without decoding
        assoc.release()
        statuses.append(int(status.Status))
    assert all(s != 0x0000 and (s >> 12) in (0xA, 0xC) for s in statuses), [hex(s) for s in statuses]

    out = Outputs(stack.bootstrap)
    uid, files = _write_head(tmp_path / "after", True, 103)
    assert _storescu_send(stack, files).returncode == 0
    out.poll_until(lambda: out.of("triage.results.fhir", uid) and out.of("triage.alerts.ich", uid))


def test_aborted_association_completes_after_the_quiet_period(stack: Stack, tmp_path: Path) -> None:
    out = Outputs(stack.bootstrap)
    uid, files = _write_head(tmp_path / "abort", False, 104)
    ae = AE(ae_title="E2E_ABORT")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", stack.dicom_port, ae_title="RADTRIAGE")
    for f in files:
        assert int(assoc.send_c_store(dcmread(f)).Status) == 0
    assoc.abort()
    out.poll_until(lambda: out.of("triage.results.fhir", uid))
    (study,) = [d for t, d, _ in out.seen if t == "imaging.studies" and d["study_uid"] == uid]
    assert study["ready_reason"] == "quiet_period"
    assert len(study["series"][0]["instance_uris"]) == len(files)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def test_ctrl_c_stops_everything(stack: Stack) -> None:
    """Last in this module: interrupts the shared stack and checks nothing is left running."""
    for consumer in _consumers:
        consumer.close()
    _consumers.clear()
    spawned = _descendants(stack.process.pid)
    # Kafka (java), Triton, the Faust worker and the DICOM listener at least.
    assert len(spawned) >= 4, spawned
    os.killpg(stack.process.pid, signal.SIGINT)
    stack.process.wait(90)
    time.sleep(0.5)
    alive = {p for p in spawned if Path(f"/proc/{p}").exists()}
    assert not alive, f"left behind: {[Path(f'/proc/{p}/cmdline').read_bytes()[:120] for p in alive]}"
    assert stack.process.returncode == 0, stack.log.read_text(errors="replace")[-3000:]
