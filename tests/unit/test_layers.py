"""The layer rule import-linter cannot state (pyproject.toml, [tool.importlinter]): the
OpenTelemetry SDK and its exporters are installed by the commands only
(radtriage/tracing_sdk.py); every library module traces through the API, as
opentelemetry-python asks of libraries, so an embedding process chooses the SDK."""

from __future__ import annotations

import ast

from radtriage.settings import REPO_ROOT

PACKAGES = ("radtriage", "streams", "processors", "connectors", "models", "schemas")
SDK = ("opentelemetry.sdk", "opentelemetry.exporter")
ALLOWED = {"radtriage/tracing_sdk.py"}


def sdk_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import of the SDK or an exporter in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found += [(node.lineno, n) for n in names if n == SDK[0] or n.startswith(SDK)]
    return found


def test_the_check_sees_an_sdk_import_however_written() -> None:
    source = (
        "import opentelemetry.sdk.trace\n"
        "from opentelemetry.exporter.otlp import x\n"
        "def f():\n"
        "    from opentelemetry.sdk import y\n"
    )
    assert [line for line, _ in sdk_imports(source)] == [1, 2, 4]
    assert sdk_imports("from opentelemetry import trace\nfrom opentelemetry.trace import Span\n") == []


def test_only_the_commands_install_the_opentelemetry_sdk() -> None:
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            rel = path.relative_to(REPO_ROOT).as_posix()
            if rel in ALLOWED:
                continue
            offenders += [f"{rel}:{line} imports {module}" for line, module in sdk_imports(path.read_text())]
    assert offenders == [], "library code must use the OpenTelemetry API only:\n" + "\n".join(offenders)
