"""A head CT phantom study written as DICOM files, as a scanner would send it to radtriage's
listener (the end-to-end tests' studies)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom


def head_ct_study(
    out: Path, seed: int, accession: str, *, bleed: bool, patient_id: str = "", **header: Any
) -> tuple[str, list[Path]]:
    """A non-contrast head CT of the phantom of `seed` (with a bleed of at least 5 ml when
    `bleed`) written under `out` with its accession, the patient `MRN-<accession>` unless
    `patient_id` is given, and any other `header` write_ct_series takes; its study UID and files."""
    ph = head_ct_phantom(np.random.default_rng(seed), bleed=bleed, min_bleed_ml=5.0)
    files = write_ct_series(
        ph.hu,
        ph.spacing_zyx,
        out,
        accession=accession,
        patient_id=patient_id or f"MRN-{accession}",
        body_part="HEAD",
        series_description="CT HEAD WO CONTRAST",
        **header,
    )
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files
