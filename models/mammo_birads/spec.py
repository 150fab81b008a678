"""The mammography BI-RADS model as the pipeline sees it (models/spec.py)."""

from models.spec import ModelSpec, Serving, Tensor

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
    serving=Serving(
        display="radtriage reference mammography BI-RADS triage (synthetic phantoms, not for clinical use)",
        about=(
            "Reference mammography (MG) BI-RADS triage model, trained on synthetic phantoms: "
            "NOT for clinical use."
        ),
        input=Tensor(
            "volume",
            (4, 256, 192),
            (
                "One screening series: the views RCC, RMLO, LCC, LMLO (zeros for a view it lacks),",
                'rows, columns (processors.preprocessing.MAMMO_INPUT_SHAPE). Named "volume" like every',
                "radtriage model's input, so the client needs no per-model name.",
            ),
        ),
        outputs=(
            Tensor(
                "probability",
                (1,),
                ("P(BI-RADS 4 or 5: suspicious), the largest over the views present.",),
            ),
            Tensor(
                "birads_probabilities",
                (4, 6),
                (
                    "Per view (RCC, RMLO, LCC, LMLO), P(BI-RADS 0..5); a row of zeros is an absent view.",
                    "processors/birads.py turns them into the suggested category.",
                ),
            ),
        ),
    ),
)
