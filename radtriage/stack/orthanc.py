"""A local PACS for `radtriage up --pacs`: Debian's Orthanc, where the results land.

Orthanc runs as a child service (its own session, stopped with the stack) on 127.0.0.1
only, its storage under `$RADTRIAGE_HOME/pacs`, with no authentication (nothing but
this machine reaches it) and, when Debian's `orthanc-dicomweb` is installed, its
DICOMweb plugin at `/dicom-web/`. `up --pacs` adds it to `dispatch.destinations` (SR,
key image, KOS of every finding), so the demo's results can be looked at in Orthanc's
web UI (`/app/explorer.html`) or its REST API (`/studies`, `/instances/{id}/file`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from radtriage.settings import RESULT_OBJECTS, DicomDestination
from radtriage.stack.process import ServiceError, ServiceProcess, port_in_use

# Where Debian's orthanc-dicomweb puts the plugin (`dpkg -L orthanc-dicomweb`).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AE_TITLE = "ORTHANC"
DESTINATION = "local-orthanc"


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).exists()), None
    )


def orthanc_config(storage: Path, dicom_port: int, http_port: int, dicomweb: bool) -> dict[str, Any]:
    """Orthanc's JSON configuration: local only, no auth, its own ports and storage (pure)."""
    return {
        "Name": "radtriage-local-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "DicomAet": AE_TITLE,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        # radtriage calls as RADTRIAGE (or its calling_ae_title): any caller may store here.
        "DicomCheckCalledAet": False,
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
        "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
    }


def destination(dicom_port: int) -> DicomDestination:
    """The local Orthanc as an export destination: every object of every finding."""
    return DicomDestination(
        name=DESTINATION,
        host="127.0.0.1",
        port=dicom_port,
        ae_title=AE_TITLE,
        objects=list(RESULT_OBJECTS),
    )


class LocalOrthanc:
    def __init__(self, home: Path, dicom_port: int, http_port: int) -> None:
        self.home, self.dicom_port, self.http_port = home, dicom_port, http_port
        self.dicomweb = DICOMWEB_PLUGIN.exists()
        self.service: ServiceProcess | None = None

    @property
    def web_ui(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/app/explorer.html"

    def start(self, timeout_s: float = 60.0) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise ServiceError("--pacs needs Orthanc: apt-get install orthanc (scripts/install.sh --test)")
        for port in (self.dicom_port, self.http_port):
            if port_in_use(port):
                raise ServiceError(f"--pacs: port {port} is in use (another Orthanc?)")
        storage = self.home / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = self.home / "orthanc.json"
        config.write_text(
            json.dumps(orthanc_config(storage, self.dicom_port, self.http_port, self.dicomweb), indent=2)
        )
        self.service = ServiceProcess("orthanc", [binary, str(config)], self.home / "orthanc.log")
        self.service.start()
        for port in (self.http_port, self.dicom_port):

            def listening(port: int = port) -> bool:
                return port_in_use(port)

            self.service.wait_until(listening, timeout_s, f"Orthanc listening on {port}")

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
