"""The whole stack with its callers locked down: every listening port refuses a client that
is not allowed, an allowed one gets through to a report and an alert, and no secret or PHI
ends up in a log or trace of the run.

`radtriage up` as an operator would configure it (environment + files): HTTP bearer
tokens from a tokens file, a DICOM caller allow-list, an MLLP source allow-list, a Triton
key; real peers (dcmtk `storescu`, python-hl7 `mllp_send`, curl, tritonclient). Kafka's
own SASL_SSL + ACLs are proven on the 3-broker cluster (tests/cluster); here the embedded
broker and Triton's metrics listen on loopback only.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tritonclient.grpc import InferenceServerClient
from tritonclient.utils import InferenceServerException

from radtriage.demo_messages import hl7_order, service_request
from tests.e2e.harness import Outputs, Stack, start_stack
from tests.support.dicom import storescu_send
from tests.support.head_study import head_ct_study

pytestmark = pytest.mark.e2e

TOKEN = "tok-" + secrets.token_urlsafe(24)
TRITON_KEY = "trk-" + secrets.token_urlsafe(24)
ALLOWED_AE = "CT_ED_SECURE"
PATIENT_NAME = "Confidential^Person"
BIRTH_DATE = "19450607"


def _security_env(home: Path) -> dict[str, str]:
    secrets_dir = home / "secrets"
    secrets_dir.mkdir(mode=0o700)
    (secrets_dir / "http-tokens").write_text(f"# rotated by the integration team\n{TOKEN}\n")
    (secrets_dir / "triton-key").write_text(TRITON_KEY + "\n")
    return {
        "RADTRIAGE_HTTP__AUTH__MODE": "bearer",
        "RADTRIAGE_HTTP__AUTH__TOKENS_FILE": str(secrets_dir / "http-tokens"),
        "RADTRIAGE_DICOM__ALLOWED_CALLERS": json.dumps([{"ae_title": ALLOWED_AE, "hosts": ["127.0.0.1"]}]),
        "RADTRIAGE_HL7__ALLOWED_SOURCES": json.dumps(["127.0.0.1"]),
        "RADTRIAGE_TRITON__API_KEY_FILE": str(secrets_dir / "triton-key"),
    }


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from start_stack(tmp_path_factory, _security_env)


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    curl = shutil.which("curl")
    assert curl, "curl is required for this test"
    return subprocess.run([curl, "-sS", "-i", *args], capture_output=True, text=True, timeout=60)


def _storescu_as(stack: Stack, aet: str, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return storescu_send(stack.dicom_port, files, calling=aet)


def _hl7_from(source: str, port: int, message: str) -> bytes:
    """Send one framed message from `source` (a local address); what came back, if anything."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(b"\x0b" + message.encode() + b"\x1c\r")
        chunks = []
        try:
            while chunk := s.recv(4096):
                chunks.append(chunk)
                if b"\x1c\r" in chunk:
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


def test_an_unauthenticated_client_is_refused_on_every_port(secure_stack: Stack, tmp_path: Path) -> None:
    stack = secure_stack
    out = Outputs(stack.bootstrap)
    base = f"http://127.0.0.1:{stack.http_port}"

    # HTTP: FHIR intake, STOW-RS, metrics and the operator page all want the token.
    order = json.dumps(service_request("SEC1", "MRN-SEC1", priority="stat", reason="code stroke"))
    for args in (
        ["-X", "POST", "-H", "Content-Type: application/fhir+json", "--data-binary", order,
         f"{base}/fhir/ServiceRequest"],
        ["-X", "POST", "-H", "Content-Type: multipart/related; type=\"application/dicom\"; boundary=x",
         "--data-binary", "--x--", f"{base}/dicomweb/studies"],
        [f"{base}/metrics"],
        [f"{base}/"],
        ["-H", "Authorization: Bearer not-the-token-at-all", f"{base}/metrics"],
    ):  # fmt: skip
        refused = _curl(*args)
        assert refused.stdout.startswith("HTTP/1.1 401"), (args, refused.stdout[:300])
        assert '"resourceType":"OperationOutcome"' in refused.stdout.replace(" ", ""), refused.stdout[-400:]
    assert _curl(f"{base}/healthz").stdout.startswith("HTTP/1.1 200")  # probes stay open

    # DICOM: an AE title not on the list is rejected at association; nothing is stored.
    uid, files = head_ct_study(
        tmp_path / "study", 4242, "SEC1", bleed=True, patient_name=PATIENT_NAME, patient_birth_date=BIRTH_DATE
    )
    rejected = _storescu_as(stack, "NOT_ALLOWED", files[:2])
    assert rejected.returncode != 0
    assert "reject" in (rejected.stdout + rejected.stderr).lower(), rejected.stderr[-500:]

    # MLLP: a connection from an address not on the list is closed with no ACK.
    message = hl7_order("SEC1", "MRN-SEC1", priority="S", indication="CODE STROKE")
    assert _hl7_from("127.0.0.2", stack.hl7_port, message) == b""

    # Triton: without the key only health answers.
    triton = InferenceServerClient(stack.env["RADTRIAGE_TRITON__GRPC_URL"])
    try:
        assert triton.is_server_ready()
        with pytest.raises(InferenceServerException):
            triton.get_model_repository_index()
    finally:
        triton.close()

    # Nothing refused reached Kafka.
    out.drain(3.0)
    assert out.of("imaging.studies", uid) == []

    # The allowed callers get through, to a report and an alert (the worker holds the Triton key).
    ordered = _curl(
        "-X", "POST", "-H", "Content-Type: application/fhir+json", "-H", f"Authorization: Bearer {TOKEN}",
        "--data-binary", order, f"{base}/fhir/ServiceRequest",
    )  # fmt: skip
    assert ordered.stdout.startswith("HTTP/1.1 201"), ordered.stdout[:500]
    (tmp_path / "adt.hl7").write_text(
        hl7_order("SEC2", "MRN-SEC2", priority="R", indication="x").replace("\r", "\n")
    )
    mllp_send = Path(sys.executable).parent / "mllp_send"
    sent = subprocess.run(
        [
            str(mllp_send),
            "--loose",
            "--file",
            str(tmp_path / "adt.hl7"),
            "--port",
            str(stack.hl7_port),
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "MSA|AA|" in sent.stdout.replace("\n", "\r"), sent.stdout + sent.stderr
    stored = _storescu_as(stack, ALLOWED_AE, files)
    assert stored.returncode == 0, stored.stderr[-500:]
    out.poll_until(lambda: out.of("triage.results.fhir", uid) and out.of("triage.alerts.ich", uid))
    assert out.of("triage.deadletter", uid) == []


def test_no_secret_or_phi_in_any_log_or_trace_of_the_run(secure_stack: Stack) -> None:
    # Runs after the test above (file order): its refused and allowed traffic is in the logs.
    files = [p for p in secure_stack.home.rglob("*") if p.is_file() and (p.suffix in {".log", ".jsonl"})]
    files.append(secure_stack.log)
    assert any(p.name == "traces.jsonl" for p in files) and len(files) >= 5, files
    needles = {
        TOKEN: "HTTP token",
        TRITON_KEY: "Triton key",
        "Confidential": "patient name",
        BIRTH_DATE: "birth date",
    }
    leaks = [
        f"{what} in {p.relative_to(secure_stack.home) if p.is_relative_to(secure_stack.home) else p}"
        for p in files
        for needle, what in needles.items()
        if needle in p.read_text(errors="replace")
    ]
    assert leaks == []
