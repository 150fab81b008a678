"""The mammography BI-RADS model as the pipeline sees it (models/spec.py)."""

from models.spec import ModelSpec

SPEC = ModelSpec(
    name="mammo_birads",
    version="1",
    finding="BIRADS",
    words="suspicious mammographic finding (BI-RADS 4 or 5)",
    # P(BI-RADS 4 or 5) covers masses, calcifications and distortions alike: no SNOMED CT
    # concept names that union (129748009 |Mass of breast| leaves the calcifications out).
    # The suggested category itself is coded (processors/fhir_report.BIRADS_CATEGORIES) in
    # a component and as the report's conclusion code.
    snomed=None,
    input="processors.model_inputs:MAMMOGRAM",
    extras=frozenset({"birads"}),
    # Preprocessed at each view's full matrix.
    working_bytes_per_pixel_byte=5.0,
    # No alert channel: a suspicious mammogram is urgent for the patient, not for the ED team.
)
