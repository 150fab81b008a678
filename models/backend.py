"""The one Triton Python-backend `model.py` of every radtriage model (docs/ARCHITECTURE.md,
Models): `deploy/triton/python_backend/model.py` is the only committed copy. A stock
tritonserver wants the file in each version directory beside the weights, so each gets a
generated copy, written (never committed) where it is absent or an older generated copy:
by every export (models/serving.py), by the local Triton launcher before it starts
(radtriage/stack/triton.py), and by `python -m models.backend <repository>` before a
repository is copied to a server. A version directory with a `model.py` of its own (no
generated header) is left alone.

Light on purpose (no torch): the launcher imports it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from radtriage.settings import PYTHON_BACKEND, default_data_dir

FILE = PYTHON_BACKEND.name
# deploy/ of a checkout, or its copy in an installed wheel (radtriage.settings.default_data_dir).
SOURCE = default_data_dir() / PYTHON_BACKEND
HEADER = (
    "# GENERATED from deploy/triton/python_backend/model.py by models/backend.py; edit that file,\n"
    "# not this copy (it is not committed, and is rewritten whenever the repository is served).\n"
)


def generated() -> str:
    """What a version directory's model.py holds: the header, then the source."""
    return HEADER + SOURCE.read_text()


def install(version_dir: Path) -> Path:
    """The generated model.py next to a version's weights (rewritten only if it differs)."""
    target = version_dir / FILE
    text = generated()
    if not target.is_file() or target.read_text() != text:
        target.write_text(text)
    return target


def install_all(repository: Path) -> list[Path]:
    """The generated model.py in every version directory of every Python-backend model of
    `repository` that has none, or an older generated one; a model's own model.py stays."""
    written = []
    for config in sorted(repository.glob("*/config.pbtxt")):
        if 'backend: "python"' not in config.read_text():
            continue
        for version in sorted(p for p in config.parent.iterdir() if p.is_dir() and p.name.isdigit()):
            target = version / FILE
            if target.is_file() and not target.read_text().startswith(HEADER):
                continue
            written.append(install(version))
    return written


if __name__ == "__main__":
    for path in install_all(Path(sys.argv[1])):
        print(path)
