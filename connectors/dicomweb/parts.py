"""One STOW-RS part: decode and validate it exactly as the C-STORE path does (pure).

The checks are connectors/dicom/validation.py's (`fully_decode`, `check_instance`, the
same refusal codes and reasons); this module only adds what differs between a
C-STORE and a part of a STOW-RS request:
- a part is a DICOM file (PS3.10), so its File Meta Information plays the role of the
  C-STORE request's Affected SOP Class/Instance UIDs and must agree with the dataset;
- the transfer syntaxes taken are the uncompressed ones; anything else is refused with
  0xC122 (the C-STORE listener negotiates compressed syntaxes too, validation.TRANSFER_
  SYNTAXES; STOW-RS keeps the narrower list tests/unit/test_stow_response.py pins);
- a file whose 128-byte preamble and "DICM" prefix were left out (some writers do) is
  taken and stored with them restored, so every blob is a complete Part 10 file.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES

from connectors.dicom import validation as v
from radtriage.blobstore import valid_uid

# PS3.18 Table 10.5.3-… failure reasons beyond C-STORE's own: Referenced Transfer Syntax not supported.
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
ACCEPTED_TRANSFER_SYNTAXES = frozenset(DEFAULT_TRANSFER_SYNTAXES)

_PREAMBLE = b"\0" * 128 + b"DICM"


@dataclass(frozen=True)
class Identity:
    """The part's SOP Class/Instance UIDs for the STOW response ("" when unknown or not a UID)."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""


@dataclass(frozen=True)
class Part:
    """A decoded part: its dataset if it can be stored, else the refusal; `part10` is the
    bytes to store (the part as received, with the preamble restored if it was missing)."""

    identity: Identity
    dataset: Dataset | None = None
    part10: bytes = b""
    refusal: v.Refusal | None = None


def _uid(value: object) -> str:
    uid = str(value or "").strip()
    return uid if valid_uid(uid) else ""


def _identity(ds: Dataset) -> Identity:
    meta = getattr(ds, "file_meta", None) or Dataset()
    try:
        return Identity(
            _uid(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")),
            _uid(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID")),
        )
    except Exception:  # a corrupt element that holds the UID: no identity to report
        return Identity()


def _meta_mismatch(ds: Dataset) -> v.Refusal | None:
    """The meta header must name the same object as the dataset: the stored file is filed
    and later read by both."""
    meta = ds.file_meta
    for meta_kw, ds_kw in (
        ("MediaStorageSOPClassUID", "SOPClassUID"),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
    ):
        if str(meta.get(meta_kw, "") or "").strip() != str(ds.get(ds_kw, "") or "").strip():
            return v.Refusal(v.DATASET_MISMATCH, f"{ds_kw} differs from the file meta header")
    return None


def read_part(data: bytes) -> Part:
    """Decode and validate one part's bytes (a DICOM file)."""
    has_preamble = data[128:132] == b"DICM"
    # Without the preamble, only a file that starts with its meta group (0002,xxxx) is taken:
    # the meta header is what says how the dataset is encoded.
    if not has_preamble and not data.startswith(b"\x02\x00"):
        return Part(
            Identity(), refusal=v.Refusal(v.CANNOT_DECODE, "not a DICOM file (no File Meta Information)")
        )
    try:
        ds = dcmread(BytesIO(data), force=not has_preamble)
    except Exception as exc:  # pydicom raises many types on a corrupt byte stream
        return Part(Identity(), refusal=v.undecodable(exc))
    identity = _identity(ds)
    transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    if not transfer_syntax:
        return Part(
            identity, refusal=v.Refusal(v.CANNOT_DECODE, "no TransferSyntaxUID in the file meta header")
        )
    if transfer_syntax not in ACCEPTED_TRANSFER_SYNTAXES:
        name = UID(transfer_syntax).name if valid_uid(transfer_syntax) else "missing"
        return Part(
            identity,
            refusal=v.Refusal(
                TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {name or transfer_syntax} not supported"
            ),
        )
    refusal = v.fully_decode(ds) or v.check_instance(ds) or _meta_mismatch(ds)
    if refusal is not None:
        return Part(identity, refusal=refusal)
    return Part(identity, dataset=ds, part10=data if has_preamble else _PREAMBLE + data)
