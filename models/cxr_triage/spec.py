"""The chest X-ray triage model as the pipeline sees it (models/spec.py)."""

from models.spec import ModelSpec

SPEC = ModelSpec(
    name="cxr_triage",
    version="1",
    finding="CXR_CRITICAL",
    words="critical chest radiograph finding",
    snomed=("36118008", "Pneumothorax"),
    input="processors.model_inputs:RADIOGRAPH",
    # Preprocessed at its full matrix (float32 copies of a 2D image).
    working_bytes_per_pixel_byte=12.0,
    # No alert channel: ARCHITECTURE.md escalates ICH and LVO only; a positive film is
    # flagged in its report.
)
