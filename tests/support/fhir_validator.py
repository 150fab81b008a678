"""The HAPI FHIR validator (R4, offline) as a test peer: what an EHR's FHIR stack says of
radtriage's reports.

HAPI FHIR 8.8.1 from Maven Central (tests/support/hapi/pom.xml) is copied once into the
cache (`<cache>/hapi-fhir-8.8.1/libs`, as radtriage/stack/kafka.py does for the broker),
and tests/support/hapi/Validate.java compiled next to it. No network at validation time:
the base specification's profiles and value sets, no terminology server, so LOINC and
SNOMED CT codes come out as warnings ("CodeSystem is unknown"), never errors.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radtriage.settings import Settings
from tests.support.java_build import built_classpath

VERSION = "8.8.1"
HERE = Path(__file__).parent / "hapi"


@dataclass(frozen=True)
class Message:
    file: str
    severity: str  # fatal, error, warning, information
    location: str
    id: str
    message: str


class ValidatorUnavailable(RuntimeError):
    pass


def _ensure(cache: Path) -> str:
    """The classpath of the compiled validator, fetched and built once per cache."""
    return built_classpath(
        cache / f"hapi-fhir-{VERSION}",
        HERE,
        HERE / "Validate.java",
        "the HAPI validator",
        ValidatorUnavailable,
        timeout_s=900,
    )


def validate(resources: Sequence[dict[str, Any]], cache: Path | None = None) -> list[Message]:
    """Every message HAPI has about each resource (one JVM for all of them)."""
    classpath = _ensure(cache or Settings().cache)
    with tempfile.TemporaryDirectory(prefix="radtriage-fhir-") as tmp:
        files = []
        for i, resource in enumerate(resources):
            path = Path(tmp) / f"{i:03d}.json"
            path.write_text(json.dumps(resource))
            files.append(str(path))
        done = subprocess.run(
            ["java", "-cp", classpath, "Validate", *files], capture_output=True, text=True, timeout=600
        )
    if done.returncode != 0:
        raise ValidatorUnavailable(f"the validator failed:\n{done.stderr[-2000:]}")
    out = []
    for line in done.stdout.splitlines():
        raw = json.loads(line)
        raw["file"] = Path(raw["file"]).stem
        out.append(Message(**raw))
    return out
