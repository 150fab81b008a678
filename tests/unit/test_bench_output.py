"""bench/output.py: how the benches write their JSON."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.output import print_or_write, run_header, stamped_path, write_json


def test_stamped_path_names_the_run_by_its_utc_time(tmp_path: Path) -> None:
    path = stamped_path(tmp_path, "latency")
    assert path.parent == tmp_path
    assert re.fullmatch(r"latency-\d{8}T\d{6}Z\.json", path.name)


def test_write_json_creates_the_folder_and_ends_with_a_newline(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "run.json"
    at = datetime(2026, 12, 8, tzinfo=UTC)
    text = write_json(path, {"n": 1, "at": at})
    assert path.read_text() == text + "\n"
    assert json.loads(text) == {"n": 1, "at": str(at)}
    assert text.startswith('{\n  "n": 1')  # indented, as the results were before


def test_print_or_write_with_json_prints_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "out.json"
    print_or_write({"bench": "x"}, path, print_only=True)
    assert not path.exists()
    out = capsys.readouterr()
    assert json.loads(out.out) == {"bench": "x"}
    assert out.err == ""


@pytest.mark.parametrize("echo", [True, False])
def test_print_or_write_writes_and_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], echo: bool
) -> None:
    path = tmp_path / "results" / "out.json"
    print_or_write({"bench": "x"}, path, print_only=False, echo=echo)
    assert json.loads(path.read_text()) == {"bench": "x"}
    out = capsys.readouterr()
    if echo:
        assert json.loads(out.out) == {"bench": "x"}
    else:
        assert out.out == ""
    assert out.err == f"wrote {path}\n"


def test_run_header_says_which_bench_when_and_where() -> None:
    header = run_header("pacs_export")
    assert header["bench"] == "pacs_export"
    assert datetime.fromisoformat(header["at"]).tzinfo is not None
    assert set(header["machine"]) == {"cpus", "arch", "python"}
