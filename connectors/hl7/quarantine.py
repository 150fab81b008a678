"""Raw bytes of refused HL7 messages, on local disk: the only place they are kept.

Dead letters on Kafka carry no PHI, so the message itself (names, birth dates,
addresses) goes here instead: `<home>/quarantine/hl7/<sha256>.hl7`, the local
equivalent of the blob store. Content-addressed, so a sender's retries of one broken
message are stored once; written atomically (temp file, fsync, rename, fsync of the
directory) so that once we have answered, the bytes survive a crash.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(folder: Path) -> None:
    if folder.is_dir():
        return
    for parent in reversed([folder, *folder.parents]):
        if not parent.is_dir():
            parent.mkdir(exist_ok=True)
            _fsync_dir(parent.parent)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Quarantine:
    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, data: bytes) -> tuple[str, str]:
        """Store `data` durably; returns (sha256, file URI)."""
        digest = sha256_hex(data)
        target = self.root / f"{digest}.hl7"
        if target.exists():
            return digest, target.resolve().as_uri()
        _ensure_dir(self.root)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming-", suffix=".hl7")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            _fsync_dir(self.root)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest, target.resolve().as_uri()
