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
