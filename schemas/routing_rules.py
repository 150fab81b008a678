"""The routing-rules file: which series go to which Triton model, on which lane.

Loaded from YAML (`deploy/routing/rules.yaml` by default) and validated here, so a
typo in a rule is a start-up error with the rule's id, not a silent mis-route.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models import registry
from schemas.requests import FindingCode, Lane


class SeriesSelection(BaseModel):
    """Which of a study's matching series a model reads, and which it prefers.

    A study from a scanner holds a scout, thin and thick reconstructions, other kernels and
    objects without pixels; the model was trained on one kind of them. A series is
    *eligible* when it passes every filter below; among the eligible the one nearest
    `prefer_slice_thickness_mm` is read, then the one with more images, then the lower
    series number (a stated order, never "the largest": the largest is the thin recon or
    the bone kernel, which the ICH model has never seen). A header the sender left empty
    does not exclude a series (an old event, a minimal sender); it ranks after known ones.
    """

    model_config = ConfigDict(extra="forbid")

    # ImageType values a series must carry, all of them (e.g. ORIGINAL, PRIMARY, AXIAL).
    image_type: list[str] = Field(default_factory=list)
    # ImageType values that exclude a series: a scout (LOCALIZER) is never read.
    exclude_image_type: list[str] = Field(default_factory=lambda: ["LOCALIZER"])
    # Regex (case-insensitive, searched) on ConvolutionKernel that excludes a series: a
    # bone or lung kernel's edge enhancement looks like blood to a soft-tissue model.
    exclude_kernel: str | None = None
    # Reconstructed slice thickness the model was trained on, mm, both ends included.
    slice_thickness_mm: tuple[float, float] | None = None
    prefer_slice_thickness_mm: float | None = Field(default=None, gt=0.0)

    @field_validator("exclude_kernel")
    @classmethod
    def _kernel_compiles(cls, value: str | None) -> str | None:
        return _compiled(value)

    @field_validator("image_type", "exclude_image_type")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [v.strip().upper() for v in values]

    @field_validator("slice_thickness_mm")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] <= value[1]:
            raise ValueError(f"slice_thickness_mm must be [min, max] with 0 <= min <= max, got {list(value)}")
        return value


def _compiled(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc}): {value!r}") from exc
    return value


class RuleMatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modality: list[str] = Field(min_length=1)
    # Any of these (case-insensitive) in BodyPartExamined; empty = any body part.
    body_part: list[str] = Field(default_factory=list)
    # Regexes (case-insensitive, searched) on SeriesDescription.
    series_description: str | None = None
    exclude_series_description: str | None = None
    min_instances: int = Field(default=1, ge=1)
    series: SeriesSelection = Field(default_factory=SeriesSelection)

    @field_validator("series_description", "exclude_series_description")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        return _compiled(value)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    description: str = ""
    match: RuleMatch
    model: str
    # The Triton model version (its version directory) the rule's studies go to: dropping in
    # validated weights as version 2 serves them only once the rules say "2", and a version
    # Triton does not serve dead-letters the study with Triton's reason. "": whatever version
    # Triton's version policy serves (the latest).
    model_version: str = Field(default="", pattern=r"^([1-9][0-9]*)?$")
    finding: FindingCode
    threshold: float = Field(ge=0.0, le=1.0)
    # For a model with a localisation map (the ICH blood map): the map value from which a
    # map cell counts as part of the finding (processors/localisation.py). Chosen with the
    # weights on their validation data, so it sits beside `threshold`: validated weights
    # dropped in with a map of their own bring their own value here, not a code change.
    # None: the reference value, processors.localisation.CELL_THRESHOLD.
    localisation_threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    # The lane while nothing is known of the study's order or the patient's location
    # (orders and ADT refine it; see streams/priority.py).
    lane: Lane = "routine"
    # The exam screens for a finding where minutes matter (a head CT for a bleed): an
    # emergency patient's study is stat even before its order arrives.
    time_critical: bool = False
    # Whether its positive findings are alerted: "none", or the alert channel its model's
    # spec names (models/<name>/spec.py), which also says the topic (triage.alerts.<channel>).
    alert: str = "none"

    @model_validator(mode="after")
    def _agrees_with_the_model(self) -> Self:
        """A rule cannot give a registered model another finding or alert channel than its
        spec's: the report's codes and the alert topic come from the spec."""
        try:
            spec = registry.get(self.model)
        except registry.UnknownModelError:
            if self.alert != "none":
                raise ValueError(f"rule {self.id}: unregistered model {self.model} cannot alert") from None
            return self
        if self.finding != spec.finding:
            raise ValueError(f"rule {self.id}: model {self.model} reports {spec.finding}, not {self.finding}")
        if self.alert not in ("none", spec.alert):
            channel = spec.alert or "no channel"
            raise ValueError(f"rule {self.id}: model {self.model} alerts on {channel}, not {self.alert!r}")
        return self


class RoutingRules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    rules: list[Rule]

    @field_validator("rules")
    @classmethod
    def _unique_ids(cls, rules: list[Rule]) -> list[Rule]:
        ids = [r.id for r in rules]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate rule id(s): {', '.join(dupes)}")
        return rules

    @classmethod
    def load(cls, path: Path) -> RoutingRules:
        with path.open(encoding="utf-8") as fh:
            return cls.model_validate(yaml.safe_load(fh))
