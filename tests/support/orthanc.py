"""A real Orthanc (Debian's `Orthanc`, installed by scripts/install.sh --test) as a peer: the
PACS that forwards studies to radtriage in the tests, and the PACS radtriage's intake is
measured against in bench/intake.py.

Its own JSON config: its own ports on 127.0.0.1, storage in a given directory, no auth, no
plugins; optionally radtriage (or any SCP) as a DICOM modality it can C-STORE to, and
optionally Debian's DICOMweb plugin (`orthanc-dicomweb`, installed by scripts/install.sh
--test) at `/dicom-web/`: the STOW-RS destination of the PACS export tests, with HTTP basic
auth when `users` are given.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from radtriage.stack.process import port_in_use, terminate_with_parent
from tests.support.net import free_port
from tests.support.process import stop_process
from tests.support.wait import wait_until

# Where Debian's orthanc-dicomweb puts the plugin (`dpkg -L orthanc-dicomweb`).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).exists()), None
    )


class Orthanc:
    """One Orthanc process. `modalities`: name -> (AE title, host, port) it may send to."""

    def __init__(
        self,
        work: Path,
        max_pdu: int = 0,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        aet: str = "ORTHANC",
        extra_config: dict[str, Any] | None = None,
        dicomweb: bool = False,
        users: dict[str, str] | None = None,
    ) -> None:
        if dicomweb and not DICOMWEB_PLUGIN.exists():
            raise FileNotFoundError(
                f"{DICOMWEB_PLUGIN} missing: orthanc-dicomweb is not installed (scripts/install.sh --test)"
            )
        self.dicom_port, self.http_port = free_port(), free_port()
        self.aet = aet
        storage = work / "orthanc-storage"
        storage.mkdir(parents=True)
        self.config = work / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "radtriage-peer",
                    "StorageDirectory": str(storage),
                    "IndexDirectory": str(storage),
                    "DicomAet": aet,
                    "DicomPort": self.dicom_port,
                    "HttpPort": self.http_port,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": bool(users),
                    "RegisteredUsers": users or {},
                    "DicomCheckCalledAet": False,
                    "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
                    "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
                    "StorageCompression": False,
                    "ConcurrentJobs": 2,
                    "LogLevel": "default",
                    "DicomModalities": {name: list(m) for name, m in (modalities or {}).items()},
                    **({"MaximumPduLength": max_pdu} if max_pdu else {}),
                    # e.g. DICOM TLS ("DicomTlsEnabled", certificates)
                    **(extra_config or {}),
                }
            )
        )
        self.users = users or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = work / "orthanc.log"
        self.log = self.log_path.open("wb")

    def start(self) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise FileNotFoundError("Orthanc is not installed (scripts/install.sh --test installs it)")
        # Orthanc's DICOM stack is dcmtk: without TCP_NODELAY=1 each C-STORE response waits
        # for the sender's delayed ACK (~40 ms), as storescu's requests would.
        env = {**os.environ, "TCP_NODELAY": "1"}
        if self.log.closed:  # started again after stop(): same ports, same storage
            self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [binary, str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=terminate_with_parent(),
        )
        for port in (self.http_port, self.dicom_port):
            wait_until(lambda p=port: port_in_use(p), f"Orthanc listening on {port}", timeout=60)

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def rest(self, method: str, path: str, body: Any = None, timeout_s: float = 300) -> Any:
        # A str goes as it is (Orthanc's /tools/lookup takes the bare UID), anything else as JSON.
        data = None if body is None else body.encode() if isinstance(body, str) else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        for user, password in list(self.users.items())[:1]:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = response.read()
        return json.loads(answer) if answer else None

    def file(self, instance_id: str) -> bytes:
        """The instance's Part 10 file as Orthanc stored it (REST `/instances/{id}/file`)."""
        url = f"http://127.0.0.1:{self.http_port}/instances/{instance_id}/file"
        with urllib.request.urlopen(url, timeout=30) as response:
            return bytes(response.read())

    def upload(self, files: Sequence[Path]) -> None:
        """Store files as they are (their own transfer syntax) through the REST API, as an
        administrator imports an archive; storescu would offer only uncompressed syntaxes."""
        for path in files:
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.http_port}/instances", data=path.read_bytes(), method="POST"
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                status = json.loads(response.read()).get("Status")
            if status not in ("Success", "AlreadyStored"):
                raise RuntimeError(f"Orthanc did not store {path.name}: {status}")

    def clear(self) -> None:
        """Delete every study, so the next run stores every instance again."""
        for study in self.rest("GET", "/studies"):
            self.rest("DELETE", f"/studies/{study}")

    def instance_count(self) -> int:
        return int(self.rest("GET", "/statistics")["CountInstances"])

    def study_id(self, study_uid: str) -> str:
        found = self.rest("POST", "/tools/lookup", study_uid)
        ids = [f["ID"] for f in found if f.get("Type") == "Study"]
        if not ids:
            raise LookupError(f"Orthanc holds no study {study_uid}")
        return str(ids[0])

    def forward(self, modality: str, study_uid: str) -> dict[str, Any]:
        """C-STORE the whole study to `modality` (one association, as Orthanc's job does),
        synchronously: Orthanc answers once every instance was sent, or with an error."""
        body = {"Resources": [self.study_id(study_uid)], "Synchronous": True}
        answer: dict[str, Any] = self.rest("POST", f"/modalities/{modality}/store", body)
        return answer

    def stop(self) -> None:
        stop_process(self.proc, 30)
        self.log.close()
