"""The ICH classifier as the pipeline sees it (models/spec.py)."""

from models.spec import ModelSpec

SPEC = ModelSpec(
    name="ich_classifier",
    version="1",
    finding="ICH",
    words="intracranial haemorrhage",
    snomed=("1386000", "Intracranial hemorrhage"),
    input="processors.model_inputs:HEAD_CT",
    # Its blood map says which slices a positive finding is on.
    extras=frozenset({"slice_range"}),
    alert="ich",
    # Read onto its working grid: the factor falls as the series grows.
    working_bytes_per_pixel_byte=2.0,
)
