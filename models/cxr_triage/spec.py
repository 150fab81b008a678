"""The chest X-ray triage model as the pipeline sees it (models/spec.py)."""

from models.spec import ModelSpec, Serving, Tensor

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
    serving=Serving(
        display="radtriage reference chest X-ray triage (synthetic phantoms, not for clinical use)",
        about=(
            "Reference chest X-ray (CR/DX) triage model, trained on synthetic phantoms: NOT for clinical use."
        ),
        input=Tensor(
            "volume",
            (1, 256, 256),
            (
                "One radiograph: channel, rows, columns (processors.preprocessing.CXR_INPUT_SHAPE).",
                'Named "volume" like every radtriage model\'s input, so the client needs no per-model name.',
            ),
        ),
        outputs=(
            Tensor(
                "probability", (1,), ("P(critical finding: pneumothorax), sigmoid applied in the model.",)
            ),
        ),
    ),
)
