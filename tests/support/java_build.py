"""A Java test peer built from Maven Central once per cache: its pom's dependencies copied
into `<home>/libs`, its one source file compiled into `<home>/classes`, a marker holding
both files' text so an edit rebuilds. Used by the HAPI FHIR validator and the HAPI FHIR
JPA server (tests/support/fhir_validator.py, tests/support/fhir_server.py).
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path


def built_classpath(
    home: Path, project: Path, source: Path, what: str, unavailable: type[RuntimeError], timeout_s: float
) -> str:
    """The classpath of `source` compiled against `project`'s pom.xml dependencies, built
    under `home` the first time (and after an edit of either file); concurrent builders
    wait for the first. `unavailable` is raised, naming `what`, when a tool is missing or
    a step fails."""
    libs, classes, marker = home / "libs", home / "classes", home / ".complete"
    stamp = source.read_text() + (project / "pom.xml").read_text()
    classpath = f"{libs}/*:{classes}"
    if marker.exists() and marker.read_text() == stamp:
        return classpath
    for tool in ("mvn", "javac", "java"):
        if shutil.which(tool) is None:
            raise unavailable(f"{what} needs {tool}: apt-get install openjdk-17-jdk maven")
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == stamp:
            return classpath
        shutil.rmtree(libs, ignore_errors=True)
        shutil.rmtree(classes, ignore_errors=True)
        steps = [
            ["mvn", "-q", "-B", "-f", str(project / "pom.xml"), "dependency:copy-dependencies",
             f"-DoutputDirectory={libs}"],
            ["javac", "-cp", f"{libs}/*", "-d", str(classes), str(source)],
        ]  # fmt: skip
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode != 0:
                raise unavailable(f"{step[0]} failed:\n{(done.stdout + done.stderr)[-2000:]}")
        marker.write_text(stamp)
    return classpath
