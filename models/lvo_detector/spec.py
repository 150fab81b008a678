"""The LVO detector as the pipeline sees it (models/spec.py)."""

from models.spec import ModelSpec, Serving, Tensor

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
    serving=Serving(
        display="radtriage reference LVO detector (synthetic phantoms, not for clinical use)",
        about=(
            "Reference large-vessel-occlusion detector, trained on synthetic phantoms: NOT for clinical use."
        ),
        input=Tensor(
            "volume",
            (3, 32, 96, 96),
            (
                "Channels (vessel window on a bone-stripped volume, bone window), slabs, rows, columns:",
                "processors.preprocessing.LVO_INPUT_SHAPE. Triton rejects any other shape.",
            ),
        ),
        outputs=(
            Tensor(
                "probability",
                (1,),
                (
                    "P(large-vessel occlusion), sigmoid applied in the model. Same name as every radtriage",
                    'model\'s main output, so a client that reads only "probability" works unchanged.',
                ),
            ),
            Tensor(
                "side_left_probability",
                (1,),
                (
                    "P(the occlusion is on the patient's left | there is one); 1 - this is P(right).",
                    "Meaningless for a study below the threshold.",
                ),
            ),
        ),
    ),
)
