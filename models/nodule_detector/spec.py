"""The lung nodule detector as the pipeline sees it (models/spec.py)."""

from models.spec import ModelSpec, Serving, Tensor

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
    serving=Serving(
        display="radtriage reference lung nodule detector (synthetic phantoms, not for clinical use)",
        about="Reference lung nodule detector, trained on synthetic phantoms: NOT for clinical use.",
        input=Tensor(
            "volume",
            (2, 96, 80, 128),
            (
                "Channels (lung window, lung region), then z, y, x of a fixed 2.5 mm grid in patient",
                "space: processors.preprocessing.NODULE_INPUT_SHAPE. Triton rejects any other shape.",
            ),
        ),
        outputs=(
            Tensor(
                "probability",
                (1,),
                (
                    "P(the study has a lung nodule) = the nodule map's maximum. Same name as every",
                    "radtriage model's main output, so a client that reads only "
                    '"probability" works unchanged.',
                ),
            ),
            Tensor(
                "nodule_map",
                (1, 96, 80, 128),
                (
                    "P(nodule) per voxel of the input grid; processors.nodules.find_nodules turns it into",
                    "nodules (centre in patient mm, diameter, probability) with the "
                    "preprocessing's geometry.",
                ),
            ),
        ),
        max_batch=4,
    ),
)
