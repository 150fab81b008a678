"""What the pipeline knows of one served model: its `ModelSpec` (docs/ARCHITECTURE.md, Models).

A model is one folder, `models/<name>/`, whose `spec.py` holds `SPEC`; streams, connectors
and the report builder read everything model-specific from it (models/registry.py) and
name no model themselves. Light on purpose: the stream worker, the schemas and the
settings import it, so nothing here may import torch, MONAI or pydicom. The series
loader and preprocessing (which do) are named by import path and resolved only where
a series is preprocessed (processors/model_inputs.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The post-processors of a model's outputs a finding can carry (processors/finding.py), each
# reading one named Triton output: the side (`side_left_probability`), the slice range
# (`localisation_map`), the BI-RADS suggestion (`birads_probabilities`), the nodule list
# (`nodule_map`).
EXTRAS = frozenset({"laterality", "slice_range", "birads", "nodules"})
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_CODE = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclass(frozen=True)
class Tensor:
    """One tensor of the served module as its Triton config declares it (TYPE_FP32, batched)."""

    name: str
    # Without the batch dimension.
    dims: tuple[int, ...]
    # What it holds, as the config's comment lines (one string a line).
    about: tuple[str, ...] = ()


@dataclass(frozen=True)
class Serving:
    """What Triton is told of the model: models/serving.py generates its config.pbtxt and
    configs/gpu.pbtxt from this and the threshold of its training run, so a model's served
    interface is written once, here, and not as a config template per recipe."""

    # The `display_name` parameter (the model card and the operator page show it).
    display: str
    # The config's header line: what the model is and that it is not for clinical use.
    about: str
    # The one input, named "volume" for every model so the client needs no per-model name:
    # its dims (the preprocessing's output shape; the export checks it) and their meaning.
    input: Tensor
    # The outputs, "probability" first: every radtriage client reads that one.
    outputs: tuple[Tensor, ...]
    max_batch: int = 8
    # Say in the `input_shape` parameter that it is what the weights were trained on
    # (model.py checks requests against it even if the input dims are ever relaxed).
    trained_shape_note: bool = False


@dataclass(frozen=True)
class ModelSpec:
    # The Triton model name: its directory in the model repository, and what rules route to.
    name: str
    # The version directory training exports to (a rule may pin another one).
    version: str
    # The finding code on the wire (`Finding.finding`, `Alert.finding`), one per model.
    finding: str
    # What the finding is, in the report's sentences ("Suspected <words>: ...").
    words: str
    # The SNOMED CT concept of the finding (code, display); None where no concept means
    # what the probability is of (the report then carries radtriage's own code only).
    snomed: tuple[str, str] | None
    # "module:attribute" of its processors.model_inputs.ModelInput (series loader and
    # preprocessing), imported only by the preprocessing processes.
    input: str
    # Which post-processors of its outputs its findings carry (EXTRAS).
    extras: frozenset[str] = frozenset()
    # The alert channel of its positive findings (topic `triage.alerts.<channel>`, see
    # radtriage.settings.Topics.alert_topic), or None: its findings are reported, never alerted.
    alert: str | None = None
    # Peak RSS of a preprocessing process above its import baseline, per byte of the
    # series' decoded pixel data (bench/preprocess.py, bench/RESULTS.md): what the
    # preprocessing pools admit its series by (processors/preprocess_pool.py). None: not
    # measured, admitted at the largest factor of the registered models.
    working_bytes_per_pixel_byte: float | None = None
    # Its Triton interface (config.pbtxt); None for a model that no recipe here exports.
    serving: Serving | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"model name {self.name!r} is not a Triton-safe lower-case identifier")
        if not self.version.isdigit() or self.version.startswith("0"):
            raise ValueError(f"model {self.name}: version {self.version!r} is not a version directory")
        if not _CODE.match(self.finding):
            raise ValueError(f"model {self.name}: finding code {self.finding!r} is not UPPER_SNAKE")
        if ":" not in self.input:
            raise ValueError(f"model {self.name}: input {self.input!r} is not 'module:attribute'")
        unknown = self.extras - EXTRAS
        if unknown:
            raise ValueError(f"model {self.name}: unknown extras {sorted(unknown)} (known: {sorted(EXTRAS)})")
        if self.alert is not None and not _NAME.match(self.alert):
            raise ValueError(
                f"model {self.name}: alert channel {self.alert!r} is not a lower-case identifier"
            )
        if self.serving is not None:
            if self.serving.input.name != "volume":
                raise ValueError(f"model {self.name}: its input is {self.serving.input.name!r}, not 'volume'")
            if not self.serving.outputs or self.serving.outputs[0].name != "probability":
                raise ValueError(f"model {self.name}: its first output is not 'probability'")
