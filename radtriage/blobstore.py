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
# A localisation map's name (processors.localisation_map.map_key: a SHA-256 in hex).
_MAP_KEY = re.compile(r"^[0-9a-f]{64}$")
# Next to the study's series folders (never a UID, so never one of them): purged with the study.
MAPS_FOLDER = "localisation-maps"


class BlobStoreError(ValueError):
    """A UID that is not a DICOM UID, or a URI this store does not hold."""


def valid_uid(uid: str) -> bool:
    """True for a DICOM UID (PS3.5 9.1). Such a UID is also a safe path component: digits
    and dots only, never empty, never `.` or `..`."""
    return len(uid) <= 64 and bool(_UID.match(uid))


def _fsync_dir(path: Path) -> None:
    # A rename or a new directory entry is durable only once its directory is synced.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobStore:
    """Instances as `<root>/<study>/<series>/<sop>.dcm`; thread-safe (no shared state)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _ensure_dir(self, folder: Path) -> None:
        if folder.is_dir():
            return
        # Create parents first and sync each new entry into its parent, so a crash after
        # we answered success cannot lose the directory that holds the instance.
        for parent in reversed([folder, *folder.parents]):
            if parent.is_dir():
                continue
            parent.mkdir(exist_ok=True)
            _fsync_dir(parent.parent)

    def _target(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for name, uid in (
            ("StudyInstanceUID", study_uid),
            ("SeriesInstanceUID", series_uid),
            ("SOPInstanceUID", sop_uid),
        ):
            if not valid_uid(uid):
                raise BlobStoreError(f"{name} {uid!r} is not a valid DICOM UID")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def uri_of(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """The URI `put_instance` stores this instance under, known before it is stored (so
        its event can be on its way while the instance is written)."""
        return self._target(study_uid, series_uid, sop_uid).as_uri()

    def put_instance(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> str:
        """Store one instance atomically and durably; returns its `file://` URI.

        A re-sent instance (same SOP Instance UID) replaces the stored one.
        """
        target = self._target(study_uid, series_uid, sop_uid)
        self._write_atomic(target, data)
        return target.as_uri()

    def _map_target(self, study_uid: str, key: str) -> Path:
        if not valid_uid(study_uid):
            raise BlobStoreError(f"StudyInstanceUID {study_uid!r} is not a valid DICOM UID")
        if not _MAP_KEY.match(key):
            raise BlobStoreError(f"localisation map key {key!r} is not a SHA-256 in hex")
        return self.root / study_uid / MAPS_FOLDER / f"{key}.json"

    def localisation_map_uri(self, study_uid: str, key: str) -> str:
        """The URI `put_localisation_map` stores this map under, known before it is stored
        (the finding naming it is published first, streams/stages/infer.py)."""
        return self._map_target(study_uid, key).as_uri()

    def put_localisation_map(self, study_uid: str, key: str, data: bytes) -> str:
        """Store a finding's localisation map (processors/localisation_map.py) under the
        study, atomically; returns its `file://` URI. The same key replaces the map."""
        target = self._map_target(study_uid, key)
        self._write_atomic(target, data)
        return target.as_uri()

    def read(self, uri: str) -> bytes:
        """What a URI of this store holds (`path_of`'s checks first)."""
        return self.path_of(uri).read_bytes()

    def _write_atomic(self, target: Path, data: bytes) -> None:
        folder = target.parent
        self._ensure_dir(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=target.suffix)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            _fsync_dir(folder)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def series_paths(self, study_uid: str, series_uid: str) -> list[Path]:
        """Every stored instance of one series (its folder's `.dcm` files, not a write in
        progress), sorted by name; empty if none is stored."""
        folder = self._target(study_uid, series_uid, "1").parent
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("*.dcm") if not p.name.startswith("."))

    def path_of(self, uri: str) -> Path:
        """The local path of a URI returned by `put_instance`; refuses anything outside root."""
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise BlobStoreError(f"unsupported blob URI scheme in {uri!r} (this store holds file:// URIs)")
        if parsed.netloc not in ("", "localhost"):
            raise BlobStoreError(f"blob URI {uri!r} names a remote host")
        path = Path(unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.root):
            raise BlobStoreError(f"blob URI {uri!r} is outside the store {self.root}")
        return path
