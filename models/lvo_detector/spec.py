"""The LVO detector as the pipeline sees it (models/spec.py)."""

from models.spec import ModelSpec

SPEC = ModelSpec(
    name="lvo_detector",
    version="1",
    finding="LVO",
    words="large-vessel occlusion",
    # The occlusion itself, not its consequence (432504007 |Cerebral infarction| is what a
    # CTA cannot show and what thrombectomy aims to prevent).
    snomed=("20059004", "Occlusion of cerebral artery"),
    input="processors.model_inputs:CTA",
    # Its side output says which hemisphere the stroke team looks at first.
    extras=frozenset({"laterality"}),
    alert="stroke",
    # Read onto its working grid: the factor falls as the series grows.
    working_bytes_per_pixel_byte=2.0,
)
