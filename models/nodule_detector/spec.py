"""The lung nodule detector as the pipeline sees it (models/spec.py)."""

from models.spec import ModelSpec

SPEC = ModelSpec(
    name="nodule_detector",
    version="1",
    finding="NODULE",
    words="lung nodule",
    snomed=("786838002", "Pulmonary nodule"),
    input="processors.model_inputs:CHEST_CT",
    extras=frozenset({"nodules"}),
    # Read onto its working grid: the factor falls as the series grows.
    working_bytes_per_pixel_byte=2.0,
)
