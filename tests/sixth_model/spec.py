"""The sixth model's spec: a pulmonary embolism detector on CT pulmonary angiograms, with a
side output and an alert channel of its own (models/spec.py)."""

from models.spec import ModelSpec

SPEC = ModelSpec(
    name="pe_detector",
    version="1",
    finding="PE",
    words="pulmonary embolism",
    snomed=("59282003", "Pulmonary embolism"),
    input="tests.sixth_model.inputs:CTPA",
    extras=frozenset({"laterality"}),
    alert="pe",
)
