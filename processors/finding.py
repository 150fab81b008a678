"""A model's answer for one request, as the finding the report and the alert are built from.

Pure: the request, Triton's outputs and the series geometry in, a `Finding` out. The
extras its model's spec names (models/spec.py, EXTRAS: side, slice range, BI-RADS
category, nodules) are each read from the model's outputs by their own processor; a
malformed extra costs the finding that extra (logged), never the study its probability
or its report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from models import registry
from processors.birads import birads_of
from processors.laterality import Side, side_of
from processors.localisation import localise
from processors.nodules import nodules_of
from processors.triton_client import Inference
from schemas.findings import Finding
from schemas.requests import TriageRequest

if TYPE_CHECKING:  # the stream worker must not import torch/MONAI: model_inputs does
    from processors.model_inputs import ModelGeometry

log = logging.getLogger(__name__)
T = TypeVar("T")


# What a finding repeats of its request unchanged: the study and series it is about, how it
# was routed, and what the report and the notify stage need to name and route it.
CARRIED_FROM_REQUEST: tuple[str, ...] = (
    "study_uid",
    "accession_number",
    "patient_id",
    "series_uid",
    "finding",
    "threshold",
    "model_name",
    "lane",
    "rule_id",
    "received_at",
    "ready_at",
    "request_id",
    "series_number",
    "series_description",
    "amends_request_id",
    "order",
    "patient_class",
)


def _extra(what: str, study_uid: str, read: Callable[[], T]) -> T | None:
    try:
        return read()
    except ValueError as exc:
        log.warning("no %s for %s: %s", what, study_uid, exc)
        return None


def build_finding(req: TriageRequest, result: Inference, geometry: ModelGeometry) -> Finding:
    extras = registry.get(req.model_name).extras
    positive = result.probability >= req.threshold
    side = side_of(result.outputs, positive) if "laterality" in extras else Side(None)
    uid = req.study_uid
    slices = birads = nodules = None
    if "slice_range" in extras:
        slices = _extra(
            "slice range", uid, lambda: localise(result.maps, geometry, positive, req.localisation_threshold)
        )
    if "birads" in extras:
        birads = _extra("BI-RADS category", uid, lambda: birads_of(result.maps, req.threshold, positive))
    if "nodules" in extras:
        nodules = _extra(
            "nodule list", uid, lambda: nodules_of(result.maps, geometry, req.threshold, positive)
        )
    carried = {name: getattr(req, name) for name in CARRIED_FROM_REQUEST}
    return Finding(
        **carried,
        probability=result.probability,
        positive=positive,
        model_version=result.model_version,
        inference_ms=result.elapsed_ms,
        laterality=side.laterality,
        laterality_probability=side.probability,
        slice_range=slices,
        birads=birads,
        nodules=nodules,
    )
