"""The claim-check store: DICOM instances on disk, events carry only their URI.

A CT study is hundreds of megabytes; Kafka carries the metadata the router needs
and a `file://` URI. Writes are atomic (temp file, fsync, rename) so a reader never
sees half an instance, and a re-sent instance simply replaces itself.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

# DICOM UID grammar (PS3.5 9.1): digits and dots, no leading zeros in components, <= 64 chars.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class BlobStoreError(ValueError):
    pass


def valid_uid(uid: str) -> bool:
    return len(uid) <= 64 and bool(_UID.match(uid))


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def put_instance(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> str:
        for name, uid in (
            ("StudyInstanceUID", study_uid),
            ("SeriesInstanceUID", series_uid),
            ("SOPInstanceUID", sop_uid),
        ):
            if not valid_uid(uid):
                raise BlobStoreError(f"{name} {uid!r} is not a valid DICOM UID")
        folder = self.root / study_uid / series_uid
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{sop_uid}.dcm"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=".dcm")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target.as_uri()

    def path_of(self, uri: str) -> Path:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise BlobStoreError(f"unsupported blob URI scheme in {uri!r} (this store holds file:// URIs)")
        path = Path(unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.root):
            raise BlobStoreError(f"blob URI {uri!r} is outside the store {self.root}")
        return path
