"""What the projection radiograph writers share (models/cxr_triage/writer.py: DX and CR;
models/mammo_birads/writer.py: MG): the stored pixels of a 12-bit image, inverted for
MONOCHROME1 (`stored_pixels`), the image pixel and calibration attributes of an unscaled,
uncompressed radiograph (`set_radiograph_pixels`), and a coded item of a DICOM context
group (`code_item`). The Part 10 file and its identity are models/dicom_writer.py's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")


def code_item(code: Code) -> Dataset:
    """A code sequence item (CodeValue, CodingSchemeDesignator, CodeMeaning)."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def check_photometric(photometric: str) -> None:
    if photometric not in PHOTOMETRIC:
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")


def stored_pixels(pixels: np.ndarray, photometric: str, max_value: int, *, mirrored: bool) -> np.ndarray:
    """The values as stored: flipped left-right where `mirrored` (as a detector read from the
    other side, or a right breast, stores them), inverted for MONOCHROME1."""
    stored = np.asarray(pixels, dtype=np.uint16)
    if mirrored:
        stored = stored[:, ::-1]
    if photometric == "MONOCHROME1":
        stored = (max_value - stored).astype(np.uint16)
    return stored


def set_radiograph_pixels(
    ds: Dataset, stored: np.ndarray, pixel_mm: Sequence[float], photometric: str, bits_stored: int
) -> None:
    """The pixel spacing (at the detector, and the same at the patient: the phantoms have no
    magnification), the image pixel module of `stored` (16 bits allocated, `bits_stored`
    used, unsigned, no rescale), a full-range window, and the pixels themselves."""
    max_value = (1 << bits_stored) - 1
    ds.ImagerPixelSpacing = [f"{float(pixel_mm[0]):.6f}", f"{float(pixel_mm[1]):.6f}"]
    ds.PixelSpacing = list(ds.ImagerPixelSpacing)
    ds.EstimatedRadiographicMagnificationFactor = "1.0"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter, ds.WindowWidth = str(max_value // 2), str(max_value)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
