"""A real FHIR server as the tests' EHR: the HAPI FHIR JPA server (R4, H2), from Maven Central.

tests/support/hapi_server/pom.xml's classpath (hapi-fhir-jpaserver-base 8.8.0 with its
Spring and Hibernate, H2, Jetty 12) is copied once into the cache
(`<cache>/hapi-fhir-jpa-8.8.0/libs`, as tests/support/fhir_validator.py does for the
validator) and tests/support/hapi_server/FhirServer.java compiled next to it; after that
first build nothing is downloaded. Start it once per test module: it takes ~30-60 s to
start on two cores (Spring, Hibernate creating its schema) and holds ~0.5 GB (-Xmx384m).
Transactions, conditional create/update and search are HAPI's own, unchanged.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import requests

from radtriage.settings import Settings
from radtriage.stack.process import terminate_with_parent
from tests.support.java_build import built_classpath
from tests.support.net import free_port
from tests.support.process import PeerProcess

VERSION = "8.8.0"
HERE = Path(__file__).parent / "hapi_server"
HEAP = "384m"
START_TIMEOUT_S = 300.0


class FhirServerUnavailable(RuntimeError):
    pass


def _ensure(cache: Path) -> str:
    """The classpath of the compiled server, fetched and built once per cache."""
    return built_classpath(
        cache / f"hapi-fhir-jpa-{VERSION}",
        HERE,
        HERE / "FhirServer.java",
        "the HAPI FHIR server",
        FhirServerUnavailable,
        timeout_s=1800,
    )


class HapiFhirServer(PeerProcess):
    """The JPA server on a port of its own, its database a file under `data_dir` (so it can be
    stopped and started again with what it stored: the tests' EHR outage)."""

    stop_grace_s = 30.0  # SIGTERM first: H2 closes its file on the JVM's shutdown

    def __init__(self, data_dir: Path, cache: Path | None = None, port: int | None = None) -> None:
        self.classpath = _ensure(cache or Settings().cache)
        self.data_dir, self.port = data_dir, port or free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.log: deque[str] = deque(maxlen=200)
        self.started_in_s = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        self.proc = subprocess.Popen(
            # SerialGC: one GC thread, no parallel collector fighting the tests for two cores.
            [
                "java",
                f"-Xmx{HEAP}",
                "-XX:+UseSerialGC",
                "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
                "-cp",
                self.classpath,
                "FhirServer",
                str(self.port),
                str(self.data_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=terminate_with_parent(),
        )
        ready = threading.Event()
        threading.Thread(target=self._read, args=(self.proc, ready), daemon=True).start()
        if not ready.wait(START_TIMEOUT_S) or self.proc.poll() is not None:
            self.stop()
            raise FhirServerUnavailable("the HAPI FHIR server did not start:\n" + "\n".join(self.log))
        self.started_in_s = time.monotonic() - began

    def _read(self, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("READY "):
                ready.set()
            elif not line.lstrip().startswith("at "):
                self.log.append(line.rstrip())
        ready.set()  # it exited: start() sees poll() set

    def search(self, resource_type: str, **params: str) -> list[dict[str, Any]]:
        """Every match of a search (all pages), the resources themselves."""
        url: str | None = f"{self.base_url}/{resource_type}"
        query: dict[str, str] | None = {**params, "_count": "100"}
        out: list[dict[str, Any]] = []
        while url is not None:
            # no-cache: HAPI runs the search again rather than reuse a recent one's results.
            page = requests.get(url, params=query, headers={"Cache-Control": "no-cache"}, timeout=30)
            page.raise_for_status()
            body = page.json()
            entries = body.get("entry", [])
            out += [e["resource"] for e in entries if e.get("search", {}).get("mode") != "outcome"]
            url = next((link["url"] for link in body.get("link", []) if link["relation"] == "next"), None)
            query = None
        return out

    def read(self, location: str) -> dict[str, Any]:
        """`DiagnosticReport/5` or `DiagnosticReport/5/_history/2`, as the server has it."""
        answer = requests.get(f"{self.base_url}/{location}", timeout=30)
        answer.raise_for_status()
        body: dict[str, Any] = answer.json()
        return body
