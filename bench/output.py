"""Where a benchmark run's JSON goes: one writer for every bench, so each run's file is
written the same way (indented, newline-terminated, its folder created) and named the same way.

Two conventions live here. Benches that keep every run write a time-stamped file under an
output folder (`stamped_path` + `write_json`). Benches that keep one current result take
`--json` to mean "print it, write nothing" (`print_or_write`). `run_header` is the
bench / at / machine opening that newer result files share.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def run_header(bench: str) -> dict[str, Any]:
    """What a result file says first about its run: which bench, when, on what machine."""
    return {
        "bench": bench,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version()},
    }


def stamped_path(folder: Path, name: str) -> Path:
    """`folder/name-YYYYmmddTHHMMSSZ.json`: a file per run, so runs never overwrite each other."""
    return folder / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"


def write_json(path: Path, doc: Any) -> str:
    """Write `doc` to `path` as indented JSON (creating the folder); returns the JSON text.

    Values JSON has no type for (datetimes, paths) are written as their str.
    """
    text = json.dumps(doc, indent=2, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return text


def print_or_write(doc: Any, path: Path, *, print_only: bool, echo: bool = True) -> None:
    """The `--json` convention: with `print_only`, print the JSON and write nothing; otherwise
    write it to `path`, print it too when `echo`, and say where it went on stderr (so stdout
    holds the JSON alone)."""
    if print_only:
        print(json.dumps(doc, indent=2, default=str))
        return
    text = write_json(path, doc)
    if echo:
        print(text)
    print(f"wrote {path}", file=sys.stderr)
