"""Every transfer syntax the SCP negotiates, end to end: encoded by an independent
encoder, sent by dcmtk's storescu proposing only that syntax, stored as received.

The source is a CT written by the project's own writer (models/dicom_writer.py: 512 x
512, 16 bits). Each case encodes it with a tool that is not radtriage's nor pydicom's
(dcmtk's dcmconv/dcmcjpeg/dcmcjpls/dcmcrle, GDCM's gdcmconv, OpenJPH's ojph_compress)
and checks: C-STORE success, the stored file carries that transfer syntax and the very
bytes sent (no transcoding), pydicom decodes it to the original pixels (exactly for a
lossless syntax, within the encoder's bound for a lossy one), and the event on Kafka
says what was received. A syntax radtriage does not take is a rejected presentation
context, logged and counted.

Encoder constraints shape the sources: JPEG baseline is 8-bit only (an 8-bit secondary
capture made from the CT), JPEG extended 12-bit at most and dcmtk's JPEG-LS near-lossless
encoder takes unsigned data only (a 12-bit unsigned copy); OpenJPH 0.9's raw reader
mishandles signed 16-bit samples, so HTJ2K gets the writer's unsigned CT (default
rescale intercept). OpenJPH writes the HTJ2K codestream; the test wraps it into the
DICOM file (encapsulated Pixel Data), which no Debian tool does.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from pydicom import dcmread
from pydicom import uid as uids
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut
from pydicom.uid import UID
from pynetdicom import AE

from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from radtriage.blobstore import LocalBlobStore
from tests.support.dicom import Listener, dcmtk_tool, storescu
from tests.support.kafka import read_topic

pytestmark = [pytest.mark.integration]

MPEG2 = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile @ Main Level: video, not taken


def _run(*args: str) -> None:
    out = subprocess.run(list(args), capture_output=True, text=True, errors="replace", timeout=120)
    assert out.returncode == 0, (args, out.stdout, out.stderr)


@dataclass(frozen=True)
class Sources:
    ct_signed: Path  # int16, negative stored values (HU as stored, padding -2000)
    ct_unsigned: Path  # uint16 (stored = HU + 1024)
    ct_12bit: Path  # uint16 with 12 bits stored
    sc_8bit: Path  # 8-bit secondary capture


def _write_ct(out: Path, *, signed: bool) -> Path:
    ph = head_ct_phantom(np.random.default_rng(16), bleed=True, shape=(1, 512, 512))
    hu = ph.hu.copy()
    # Padding outside the field of view, as scanners write it.
    hu[:, :48, :48] = -2000 if signed else -1024
    (path,) = write_ct_series(
        hu,
        ph.spacing_zyx,
        out,
        accession="ACCTS",
        patient_id="MRNTS",
        # Stored = HU (signed, down to -2000) or HU + 1024 (unsigned).
        rescale_intercept=0.0 if signed else -1024.0,
    )
    ds = dcmread(path)
    assert ds.PixelRepresentation == (1 if signed else 0) and ds.pixel_array.min() < (0 if signed else 1)
    return path


def _derived(src: Path, out: Path, change: Callable[[Dataset], None]) -> Path:
    ds = dcmread(src)
    change(ds)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def _to_12bit(ds: Dataset) -> None:
    hu = ds.pixel_array.astype(np.int32)  # the unsigned CT: HU + 1024
    ds.PixelData = np.clip(hu, 0, 4095).astype(np.uint16).tobytes()
    ds.BitsStored, ds.HighBit = 12, 11


def _to_8bit_secondary_capture(ds: Dataset) -> None:
    hu = ds.pixel_array.astype(np.float64) - 1024
    window = np.clip((hu + 100) / 300 * 255, 0, 255).round().astype(np.uint8)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uids.SecondaryCaptureImageStorage
    ds.ConversionType = "WSD"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    ds.PixelData = window.tobytes()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    root = tmp_path_factory.mktemp("sources")
    unsigned = _write_ct(root / "unsigned", signed=False)
    return Sources(
        ct_signed=_write_ct(root / "signed", signed=True),
        ct_unsigned=unsigned,
        ct_12bit=_derived(unsigned, root / "12bit" / "ct12.dcm", _to_12bit),
        sc_8bit=_derived(unsigned, root / "8bit" / "sc8.dcm", _to_8bit_secondary_capture),
    )


def _ojph(src: Path, out: Path, syntax: str, *options: str) -> Path:
    """HTJ2K: OpenJPH encodes the raw samples; the codestream goes into the CT's Pixel Data."""
    ds = dcmread(src)
    raw, codestream = out.with_suffix(".yuv"), out.with_suffix(".j2c")
    ds.pixel_array.astype("<u2").tofile(raw)
    bits = str(ds.BitsStored)
    dims = f"{{{ds.Columns},{ds.Rows}}}"
    _run("ojph_compress", "-i", str(raw), "-o", str(codestream), "-dims", dims, "-num_comps", "1",
         "-signed", "false", "-bit_depth", bits, "-downsamp", "{1,1}", *options)  # fmt: skip
    ds.PixelData = encapsulate([codestream.read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == uids.HTJ2K:
        ds.LossyImageCompression = "01"
    ds.save_as(out, enforce_file_format=True)
    return out


Encoder = Callable[[Sources, Path], tuple[Path, Path]]  # -> (file to send, its original)


def _dcmtk(tool: str, source: str, *options: str) -> Encoder:
    def encode(src: Sources, out: Path) -> tuple[Path, Path]:
        original = getattr(src, source)
        _run(dcmtk_tool(tool), *options, str(original), str(out))
        return out, original

    return encode


def _gdcm(*options: str) -> Encoder:
    def encode(src: Sources, out: Path) -> tuple[Path, Path]:
        _run("gdcmconv", *options, str(src.ct_signed), str(out))
        return out, src.ct_signed

    return encode


def _htj2k(syntax: str, *options: str) -> Encoder:
    def encode(src: Sources, out: Path) -> tuple[Path, Path]:
        return _ojph(src.ct_unsigned, out, syntax, *options), src.ct_unsigned

    return encode


@dataclass(frozen=True)
class Case:
    syntax: str
    encode: Encoder
    # None: lossless (decoded pixels equal the original); else the largest absolute
    # difference the encoder promises (near-lossless) or None and a PSNR floor in dB.
    max_error: int | None = 0
    min_psnr_db: float | None = None
    # dcmtk 3.6.7 (Debian's) and GDCM 3.0.21 do not know the HTJ2K syntaxes (storescu
    # reads such a file as explicit little endian and cannot send it), so those cases are
    # sent by pynetdicom: the same library as the SCP on the network side, the codestream
    # still OpenJPH's.
    sender: str = "storescu"


CASES: dict[str, Case] = {
    "implicit-le": Case(uids.ImplicitVRLittleEndian, _dcmtk("dcmconv", "ct_signed", "+ti")),
    "explicit-le": Case(uids.ExplicitVRLittleEndian, _dcmtk("dcmconv", "ct_signed", "+te")),
    "explicit-be": Case(uids.ExplicitVRBigEndian, _dcmtk("dcmconv", "ct_signed", "+tb")),
    "deflated": Case(uids.DeflatedExplicitVRLittleEndian, _dcmtk("dcmconv", "ct_signed", "+td")),
    "jpeg-baseline": Case(
        uids.JPEGBaseline8Bit, _dcmtk("dcmcjpeg", "sc_8bit", "+eb"), max_error=None, min_psnr_db=35
    ),
    "jpeg-extended": Case(
        uids.JPEGExtended12Bit, _dcmtk("dcmcjpeg", "ct_12bit", "+ee"), max_error=None, min_psnr_db=45
    ),
    "jpeg-lossless-p14": Case(uids.JPEGLossless, _dcmtk("dcmcjpeg", "ct_signed", "+el")),
    "jpeg-lossless-sv1": Case(uids.JPEGLosslessSV1, _dcmtk("dcmcjpeg", "ct_signed", "+e1")),
    "jpeg-ls-lossless": Case(uids.JPEGLSLossless, _dcmtk("dcmcjpls", "ct_signed", "+el")),
    "jpeg-ls-near-lossless": Case(
        uids.JPEGLSNearLossless, _dcmtk("dcmcjpls", "ct_12bit", "+en", "+md", "2"), max_error=2
    ),
    "jpeg2000-lossless": Case(uids.JPEG2000Lossless, _gdcm("--j2k")),
    "jpeg2000": Case(uids.JPEG2000, _gdcm("--j2k", "--lossy", "-r", "10"), max_error=None, min_psnr_db=50),
    "htj2k-lossless": Case(
        uids.HTJ2KLossless, _htj2k(uids.HTJ2KLossless, "-reversible", "true"), sender="pynetdicom"
    ),
    # OpenJPH's default progression is RPCL; 0.9 cannot add the TLM marker segment PS3.5
    # A.4.6 also asks of this syntax, which no decoder needs.
    "htj2k-lossless-rpcl": Case(
        uids.HTJ2KLosslessRPCL,
        _htj2k(uids.HTJ2KLosslessRPCL, "-reversible", "true", "-prog_order", "RPCL"),
        sender="pynetdicom",
    ),
    "htj2k": Case(
        uids.HTJ2K,
        _htj2k(uids.HTJ2K, "-qstep", "0.0002"),
        max_error=None,
        min_psnr_db=50,
        sender="pynetdicom",
    ),
    "rle": Case(uids.RLELossless, _dcmtk("dcmcrle", "ct_signed")),
}


def _profile(path: Path, sop_class: str, syntax: str) -> Path:
    """A storescu association profile proposing `sop_class` in `syntax` only."""
    path.write_text(
        "[[TransferSyntaxes]]\n[Only]\nTransferSyntax1 = " + syntax + "\n"
        "[[PresentationContexts]]\n[Contexts]\nPresentationContext1 = " + sop_class + "\\Only\n"
        "[[Profiles]]\n[Profile]\nPresentationContexts = Contexts\n"
    )
    return path


def _send_only(
    listener: Listener, file: Path, sop_class: str, syntax: str
) -> subprocess.CompletedProcess[str]:
    profile = _profile(file.with_suffix(".cfg"), sop_class, syntax)
    return storescu(
        "-v", "-xf", str(profile), "Profile", "-aec", listener.settings.dicom.ae_title,
        "127.0.0.1", str(listener.port), str(file),
    )  # fmt: skip


def _psnr(decoded: np.ndarray, original: np.ndarray, bits: int) -> float:
    mse = float(np.mean((decoded - original) ** 2))
    peak = float(2**bits - 1)
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


@pytest.mark.parametrize("name", list(CASES))
def test_each_transfer_syntax_is_stored_as_received(
    name: str, sources: Sources, listener: Listener, tmp_path: Path
) -> None:
    case = CASES[name]
    sent, original = case.encode(sources, tmp_path / f"{name}.dcm")
    sent_ds = dcmread(sent)
    assert sent_ds.file_meta.TransferSyntaxUID == case.syntax  # the encoder did what we asked

    if case.sender == "storescu":
        out = _send_only(listener, sent, str(sent_ds.SOPClassUID), case.syntax)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Received Store Response (Success)" in out.stdout + out.stderr, out.stdout + out.stderr
    else:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(str(sent_ds.SOPClassUID), [case.syntax])
        assoc = ae.associate("127.0.0.1", listener.port, ae_title=listener.settings.dicom.ae_title)
        assert assoc.is_established
        try:
            assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == [case.syntax]
            status = assoc.send_c_store(sent_ds)
        finally:
            assoc.release()
        assert int(status.Status) == 0x0000

    (record,) = [
        r
        for r in read_topic(listener.settings.kafka.bootstrap_servers, listener.topic, 2)
        if r.value["kind"] == "instance"
    ]
    event = record.value
    stored_path = LocalBlobStore(listener.settings.blob_dir).path_of(event["blob_uri"])
    stored = dcmread(stored_path)
    # Stored as received: the negotiated syntax in the meta header, the encoder's pixel data
    # byte for byte, every other element as sent. (The dataset's bytes are the sender's
    # encoding, not the file's: dcmtk writes a sequence of undefined length in the file
    # with its length on the wire, and inflates and deflates a deflated stream again.)
    assert stored.file_meta.TransferSyntaxUID == case.syntax
    assert stored.PixelData == sent_ds.PixelData
    assert stored == sent_ds

    # Compared as modality values (HU): dcmtk's 12-bit JPEG encoder rescales the stored
    # range and says so in RescaleIntercept/Slope.
    decoded = apply_modality_lut(stored.pixel_array, stored).astype(np.float64)
    original_ds = dcmread(original)
    reference = apply_modality_lut(original_ds.pixel_array, original_ds).astype(np.float64)
    assert decoded.shape == reference.shape == (512, 512)
    if case.max_error == 0:
        assert np.array_equal(decoded, reference)
    elif case.max_error is not None:
        assert float(np.abs(decoded - reference).max()) <= case.max_error
    if case.min_psnr_db is not None:
        assert _psnr(decoded, reference, int(original_ds.BitsStored)) >= case.min_psnr_db

    assert event["transfer_syntax_uid"] == case.syntax
    assert event["sop_class_uid"] == str(sent_ds.SOPClassUID)
    assert (event["has_pixels"], event["rows"], event["columns"], event["frames"]) == (True, 512, 512, 1)
    assert event["bits_allocated"] == int(sent_ds.BitsAllocated)
    assert (event["series_number"], event["instance_number"]) == (1, 1)
    # A lossy encoder marks its output DERIVED (PS3.3 C.7.6.1.1.2); the event says what came.
    assert event["image_type"] == [str(t).strip().upper() for t in sent_ds.ImageType]
    assert event["image_type"][1:] == ["PRIMARY", "AXIAL"]
    assert event["slice_thickness_mm"] == pytest.approx(float(sent_ds.SliceThickness))


def _rejected_contexts(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "radtriage_dicom_rejected_presentation_contexts_total", {"reason": reason}
    )
    return value or 0.0


def test_an_unsupported_syntax_is_a_rejected_context_logged_and_counted(
    sources: Sources, listener: Listener, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="connectors.dicom")
    before = _rejected_contexts("transfer_syntaxes_not_supported")
    # A CT proposed in MPEG2 only (the file itself is uncompressed; it is never sent).
    out = _send_only(listener, sources.ct_signed, uids.CTImageStorage, MPEG2)
    assert out.returncode != 0
    assert (
        "No presentation context" in out.stdout + out.stderr
        or "no acceptable" in (out.stdout + out.stderr).lower()
    ), out.stdout + out.stderr
    assert _rejected_contexts("transfer_syntaxes_not_supported") == before + 1
    (line,) = [r.getMessage() for r in caplog.records if "presentation context" in r.getMessage()]
    assert "from STORESCU" in line and "transfer_syntaxes_not_supported" in line
    assert "CT Image Storage" in line and MPEG2 in line and UID(MPEG2).name in line
    assert not list(listener.settings.blob_dir.rglob("*.dcm"))
