"""The ICH classifier as the pipeline sees it (models/spec.py)."""

from models.spec import ModelSpec, Serving, Tensor

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
    serving=Serving(
        display="radtriage reference ICH classifier (synthetic phantoms, not for clinical use)",
        about=(
            "Reference intracranial-haemorrhage classifier, trained on synthetic phantoms: "
            "NOT for clinical use."
        ),
        input=Tensor(
            "volume",
            (3, 32, 96, 96),
            (
                "Channels (brain, narrow blood and bone windows), slices, rows, columns:",
                "processors.preprocessing.ICH_INPUT_SHAPE. Triton rejects any other shape.",
            ),
        ),
        outputs=(
            Tensor(
                "probability",
                (1,),
                ("Sigmoid applied in the model: probability of intracranial haemorrhage.",),
            ),
            Tensor(
                "localisation_map",
                # The input's slices, rows and columns over the network's map pooling (2, 4, 4).
                (16, 24, 24),
                (
                    "The network's blood map, sigmoid applied: P(blood) per cell of 2 model slices x 4 x 4",
                    "voxels of the input (processors/localisation.py maps it back to the series' slices",
                    'for the finding\'s slice range). Clients that read only "probability" ignore it.',
                ),
            ),
        ),
        trained_shape_note=True,
    ),
)
