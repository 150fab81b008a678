"""End to end through every intake, as an interface engineer tries it: HL7 orders with
python-hl7's `mllp_send`, FHIR with curl, images with dcmtk's `storescu` and a DICOMweb
client (STOW-RS), `radtriage demo` showing STAT orders change the lane, and no PHI on
any topic, log or trace afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from pydicom import dcmread

from radtriage.demo_messages import hl7_order, service_request
from radtriage.settings import REPO_ROOT
from tests.e2e.harness import Outputs, Stack
from tests.support.dicom import storescu_send
from tests.support.head_study import head_ct_study

pytestmark = pytest.mark.e2e

# Identifying data of the synthetic patients below: none of it may leave a connector.
PHI = ("Secret^Patient", "Phantom^Demo", "Demo^Phantom", "19811203", "19700101", "Elm Street")


def _head(tmp: Path, seed: int, accession: str, bleed: bool) -> tuple[str, list[Path]]:
    return head_ct_study(
        tmp, seed, accession, bleed=bleed, patient_name="Secret^Patient", patient_birth_date="19811203"
    )


def _storescu_send(stack: Stack, files: list[Path]) -> None:
    sent = storescu_send(stack.dicom_port, files, calling="E2E_SCU")
    assert sent.returncode == 0, sent.stderr


def _lanes(out: Outputs, uid: str) -> list[str]:
    return [
        d["detail"]["lane"]
        for d in out.of("triage.audit", uid)
        if d["stage"] == "route" and d["decision"] in ("routed", "lane_upgraded")
    ]


def test_orders_from_mllp_send_and_curl_set_the_lane(stack: Stack, tmp_path: Path) -> None:
    out = Outputs(stack.bootstrap)
    # A routine outpatient order (HL7, mllp_send) for a head CT the rules alone would run stat.
    routine_uid, routine_files = _head(tmp_path / "routine", 201, "E2EORD1", bleed=False)
    order = hl7_order("E2EORD1", "MRN-E2EORD1", priority="R", indication="chronic headache")
    order = order.replace("PV1|1|E|", "PV1|1|O|").replace("Phantom^Demo", "Secret^Patient")
    order = order.replace("19700101", "19811203")
    # One segment per line, as an interface engineer keeps messages in a file (--loose).
    (tmp_path / "orders.hl7").write_text(order.replace("\r", "\n"))
    mllp_send = Path(sys.executable).parent / "mllp_send"
    args = ["--loose", "--file", str(tmp_path / "orders.hl7"), "--port", str(stack.hl7_port), "127.0.0.1"]
    sent = subprocess.run(
        [str(mllp_send), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    assert "MSA|AA|ORME2EORD1" in sent.stdout.replace("\n", "\r"), sent.stdout

    # A STAT code-stroke ServiceRequest (FHIR, curl) for a bleed.
    stat_uid, stat_files = _head(tmp_path / "stat", 202, "E2EORD2", bleed=True)
    body = service_request("E2EORD2", "MRN-E2EORD2", priority="stat", reason="code stroke")
    curl = shutil.which("curl")
    assert curl, "curl is required for this test"
    posted = subprocess.run(
        [
            curl, "-sS", "-i", "-X", "POST", "-H", "Content-Type: application/fhir+json",
            "--data-binary", json.dumps(body), f"http://127.0.0.1:{stack.http_port}/fhir/ServiceRequest",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert posted.returncode == 0, posted.stderr
    assert posted.stdout.startswith("HTTP/1.1 201"), posted.stdout[:500]
    assert "Location:" in posted.stdout or "location:" in posted.stdout

    _storescu_send(stack, routine_files)
    _storescu_send(stack, stat_files)
    out.poll_until(
        lambda: (
            out.of("triage.results.fhir", routine_uid)
            and out.of("triage.results.fhir", stat_uid)
            and out.of("triage.alerts.ich", stat_uid)
        )
    )
    assert _lanes(out, routine_uid) == ["routine"]
    assert _lanes(out, stat_uid) == ["stat"]
    (alert,) = out.of("triage.alerts.ich", stat_uid)
    assert alert["lane"] == "stat"
    (routed,) = [d for d in out.of("triage.audit", stat_uid) if d["decision"] == "routed"]
    assert routed["detail"]["order_source"] == "fhir" and routed["detail"]["order_priority"] == "stat"


def test_stow_rs_series_flows_to_a_report_and_an_alert(stack: Stack, tmp_path: Path) -> None:
    out = Outputs(stack.bootstrap)
    uid, files = _head(tmp_path / "stow", 203, "E2ESTOW1", bleed=True)
    client = DICOMwebClient(url=f"http://127.0.0.1:{stack.http_port}/dicomweb")
    response = client.store_instances([dcmread(f) for f in files])
    assert "FailedSOPSequence" not in response
    assert len(response.ReferencedSOPSequence) == len(files)
    out.poll_until(lambda: out.of("triage.results.fhir", uid) and out.of("triage.alerts.ich", uid))
    out.drain(2.0)
    assert len(out.of("triage.alerts.ich", uid)) == 1
    (study,) = out.of("imaging.studies", uid)
    assert len(study["series"][0]["instance_uris"]) == len(files)


SNOMED = "http://snomed.info/sct"
# What each route's positive report must be coded with (processors/fhir_report.py): the
# finding's SNOMED CT concept in the report's conclusionCode, the model in every Observation.
CONCLUSION_CODES = {
    "ICH": "1386000",  # Intracranial hemorrhage
    "LVO": "20059004",  # Occlusion of cerebral artery
    "CXR_CRITICAL": "36118008",  # Pneumothorax
    "BIRADS": "397145000",  # Mammography assessment (Category 5)
    "NODULE": "786838002",  # Pulmonary nodule
}


def _codes(concept: dict) -> set[tuple[str, str]]:  # type: ignore[type-arg]
    return {(c.get("system", ""), c.get("code", "")) for c in concept.get("coding", [])}


def _check_report_codes(outcome: dict, bundle: dict) -> None:  # type: ignore[type-arg]
    # The report, its Observations, then the model as a Device (last).
    report, *observations, device = [e["resource"] for e in bundle["entry"]]
    assert device["resourceType"] == "Device" and device["deviceName"][0]["name"] == outcome["route"]
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "preliminary"
    assert (SNOMED, CONCLUSION_CODES[outcome["finding"]]) in _codes(report["conclusionCode"][0]), report
    assert [r["reference"] for r in report["result"]] == [e["fullUrl"] for e in bundle["entry"][1:-1]]
    for obs in observations:
        assert obs["device"]["display"] == f"{outcome['route']} version 1", obs
    if outcome["finding"] == "NODULE":
        # One Observation per nodule, members of the finding's: coded, sized, in its lung.
        finding_obs, *nodules = observations
        members = [m["reference"] for m in finding_obs["hasMember"]]
        assert members == [e["fullUrl"] for e in bundle["entry"][2:-1]]
        assert nodules and all((SNOMED, "786838002") in _codes(n["code"]) for n in nodules)
        top = nodules[0]
        assert (SNOMED, "3341006") in _codes(top["bodySite"]) and top["valueQuantity"]["code"] == "mm"
        diameter = [c for c in top["component"] if (SNOMED, "81827009") in _codes(c["code"])]
        assert len(diameter) == 1 and 14.0 <= diameter[0]["valueQuantity"]["value"] <= 22.0, top
    elif outcome["finding"] != "BIRADS":
        assert (SNOMED, CONCLUSION_CODES[outcome["finding"]]) in _codes(observations[0]["code"])


def test_demo_shows_stat_orders_changing_the_lane(stack: Stack, tmp_path: Path) -> None:
    result = tmp_path / "demo.json"
    out = Outputs(stack.bootstrap)
    ran = subprocess.run(
        [sys.executable, "-m", "radtriage.cli", "demo", "--json", str(result)],
        env=stack.env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    outcomes = {o["case"]: o for o in json.loads(result.read_text())["outcomes"]}
    assert outcomes["head CT, bleed, STAT order first"]["lanes"] == ["stat"]
    late = outcomes["head CT, bleed, STAT order late"]["lanes"]
    assert late[0] == "routine" and late[-1] == "stat"
    assert outcomes["head CT, normal, routine order"]["lanes"] == ["routine"]
    assert all(o["alert"] for o in outcomes.values() if o["expected"] == "alert")
    assert "lane" in ran.stdout and "stat" in ran.stdout
    # Every route's kind of finding: ICH, LVO with its side (stat for an ED patient before
    # any order: the CTA route is time-critical), a positive chest film reported, not alerted.
    assert {o["finding"] for o in outcomes.values() if o["expected"] != "unrouted"} == {
        "ICH",
        "LVO",
        "CXR_CRITICAL",
        "BIRADS",
        "NODULE",
    }
    # Where each positive finding is: the bleed's slices (its alert and report carry them),
    # the occlusion's side.
    for case in ("head CT, bleed, STAT order first", "head CT, bleed, STAT order late"):
        assert outcomes[case]["detail"].startswith("image"), outcomes[case]
    assert outcomes["head CT, normal, routine order"]["detail"] == ""
    # The suspicious mammogram: reported (routine, no alert) with its suggested category and
    # the breast it is in.
    mammo = outcomes["mammogram, suspicious"]
    assert (mammo["route"], mammo["lanes"], mammo["alert"], mammo["report"]) == (
        "mammo_birads",
        ["routine"],
        False,
        True,
    ), mammo
    assert mammo["detail"].startswith("BI-RADS 5, right breast"), mammo
    # The chest CT's nodule: reported (routine, no alert) with its size and lung, as the
    # phantom has it (the demo case states the size and lung it expects).
    nodule = outcomes["chest CT, lung nodule"]
    assert (nodule["route"], nodule["lanes"], nodule["alert"], nodule["report"]) == (
        "nodule_detector",
        ["routine"],
        False,
        True,
    ), nodule
    assert nodule["detail"].startswith(nodule["expect_detail"]) and " lung (p " in nodule["detail"], nodule
    assert outcomes["CT abdomen (no rule)"]["route"] == "unrouted"
    cta = outcomes["CTA, left LVO, ED patient, no order"]
    assert cta["detail"].startswith("left side"), cta
    assert (cta["route"], cta["lanes"], cta["laterality"], cta["alert"]) == (
        "lvo_detector",
        ["stat"],
        "left",
        True,
    )
    film = outcomes["chest film, pneumothorax"]
    assert (film["route"], film["lanes"], film["positive"], film["alert"]) == (
        "cxr_triage",
        ["routine"],
        True,
        False,
    )
    # A study of each kind reached its model and its report carries the right codes.
    positives = [o for o in outcomes.values() if o["expected"] != "unrouted" and o["positive"]]
    assert {o["finding"] for o in positives} == set(CONCLUSION_CODES)
    out.poll_until(lambda: all(out.of("triage.results.fhir", o["study_uid"]) for o in positives))
    for o in positives:
        results = out.of("triage.results.fhir", o["study_uid"])
        assert results and {r["finding"] for r in results} == {o["finding"]}, (o["case"], results)
        _check_report_codes(o, results[-1]["bundle"])


def test_no_phi_on_any_topic_log_or_trace(stack: Stack) -> None:
    """Last in this module: after every intake ran, read every topic on the broker (ours,
    the internal join topics, Faust's changelogs) from the start, and every log and trace."""
    admin = KafkaAdminClient(bootstrap_servers=stack.bootstrap)
    topics = [t for t in admin.list_topics() if not t.startswith("__")]
    admin.close()
    assert {"imaging.orders", "imaging.instances", "triage.audit", "triage.deadletter"} <= set(topics)
    consumer = KafkaConsumer(bootstrap_servers=stack.bootstrap, group_id=None, enable_auto_commit=False)
    parts = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    ends = consumer.end_offsets(parts)
    blobs: dict[str, int] = {}
    leaks: list[str] = []
    while any(consumer.position(tp) < ends[tp] for tp in parts):
        for tp, records in consumer.poll(timeout_ms=500).items():
            for r in records:
                blobs[tp.topic] = blobs.get(tp.topic, 0) + 1
                raw = (r.key or b"") + (r.value or b"") + b"".join(v for _, v in r.headers or [])
                text = raw.decode("utf-8", errors="replace")
                leaks += [f"{tp.topic}: {p}" for p in PHI if p in text]
    consumer.close()
    assert blobs.get("imaging.orders", 0) >= 3 and blobs.get("imaging.instances", 0) > 0, blobs
    assert leaks == [], leaks[:20]
    files = [*sorted((stack.home / "logs").glob("*.log")), stack.home / "traces.jsonl"]
    assert (stack.home / "traces.jsonl").exists()
    for path in files:
        text = path.read_text(errors="replace")
        found = [p for p in PHI if p in text]
        assert found == [], f"{path.name} contains {found}"
