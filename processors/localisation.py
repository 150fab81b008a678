"""Coarse localisation of a finding: the slices of the series a model's map points at.

A model that localises declares a Triton output `localisation_map`: for each cell of a
coarse grid over its input, P(the finding is in this cell), shaped (D', H', W') per study
with the first axis along the model input's slices. The ICH classifier serves its blood
map this way ((16, 24, 24): two model slices and 4 x 4 voxels a cell, models/ich_classifier/net.py).

What makes a cell index mean something in the study is the preprocessing's crop
(`SliceCrop`, made by `processors.preprocessing`: series slices [start, stop) resampled
linearly onto the model's slices) and the loaded series' own geometry (positions and InstanceNumbers
of its slices, sorted along the normal by `load_series`): together a `SeriesGeometry`, carried
from the preprocessing to the finding. Its `PlaneField` (the in-plane part of the series the
model input covers) maps the map's cells onto pixels too: the DICOM SEG
(processors/localisation_map.py, processors/dicom_seg.py). Everything here is pure, and light (no torch: the
stream worker imports it).

How cells become a range: the slice profile is each map slice's strongest cell; the range
runs from the first to the last map slice at or above CELL_THRESHOLD; a positive finding
whose map stays below it everywhere still gets the single strongest map slice (the model
alerted, so the best guess of where is worth more than nothing). Negative findings get no
range. CELL_THRESHOLD was chosen for the reference ICH weights on validation phantoms and
checked on held-out ones by `python -m models.ich_classifier.localisation_eval`
(models/ich_classifier/metrics.json, "localisation"); a routing rule's
`localisation_threshold` replaces it for weights of its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from schemas.findings import SliceRange

if TYPE_CHECKING:
    from processors.dicom_volume import Volume

LOCALISATION_OUTPUT = "localisation_map"
# The reference ICH weights' value, chosen on validation phantoms by
# models/ich_classifier/localisation_eval.py (best mean slice IoU); the default of a rule without its own.
CELL_THRESHOLD = 0.75


@dataclass(frozen=True)
class SliceCrop:
    """Which slices of the input volume a model input covers: slices [start, stop) of the
    volume (in the order given, i.e. along the slice normal) resampled, linearly, onto
    `depth` model slices."""

    start: int
    stop: int
    depth: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.stop and self.depth > 0):
            raise ValueError(f"not a slice crop: {self}")


@dataclass(frozen=True)
class PlaneField:
    """Which part of a slice the model input covers in-plane: rows [row_start, row_stop)
    and columns [col_start, col_stop) of the slice's pixels (edges, continuous: pixel r
    spans [r, r + 1)), resampled onto the model's rows and columns. The field is the head's
    box padded square, so it may reach past the image (negative starts, stops past the size)."""

    row_start: float
    row_stop: float
    col_start: float
    col_stop: float

    def __post_init__(self) -> None:
        if not (self.row_start < self.row_stop and self.col_start < self.col_stop):
            raise ValueError(f"not an in-plane field: {self}")

    def scaled(self, rows: int, cols: int) -> PlaneField:
        """The same field counted in pixels `rows` (`cols`) times smaller: a pooled volume's
        field in the series' own pixels (pooled pixel r averages series pixels [r k, (r + 1) k))."""
        return PlaneField(
            self.row_start * rows, self.row_stop * rows, self.col_start * cols, self.col_stop * cols
        )


@dataclass(frozen=True)
class SeriesGeometry:
    """What maps a model slice back to the series (small and picklable: it travels back
    from the preprocessing process with the tensor)."""

    crop: SliceCrop
    positions_mm: tuple[float, ...]  # per series slice, ascending along the slice normal
    instance_numbers: tuple[int | None, ...]  # per series slice, same order
    # In the series' own pixels; None where the preprocessing did not say (only the slice
    # range can then be mapped back, not the cells in-plane: no SEG).
    field: PlaneField | None = None

    def __post_init__(self) -> None:
        n = len(self.positions_mm)
        if len(self.instance_numbers) != n:
            raise ValueError(f"{n} positions but {len(self.instance_numbers)} instance numbers")
        if self.crop.stop > n:
            raise ValueError(f"crop {self.crop} reaches past the series' {n} slices")


def series_geometry(
    volume: Volume, crop: SliceCrop, field: PlaneField | None = None
) -> SeriesGeometry | None:
    """The geometry of a loaded series and its crop; None when the volume does not carry
    per-slice positions (not loaded by `load_series`) or they do not fit the crop."""
    if len(volume.positions_mm) != volume.hu.shape[0] or crop.stop > volume.hu.shape[0]:
        return None
    numbers = volume.instance_numbers
    if len(numbers) != len(volume.positions_mm):
        numbers = (None,) * len(volume.positions_mm)
    return SeriesGeometry(crop, volume.positions_mm, numbers, field)


def slice_profile(cell_map: np.ndarray) -> np.ndarray:
    """(D', H', W') or (1, D', H', W') map → (D',): each map slice's strongest cell."""
    m = np.asarray(cell_map, dtype=np.float32)
    if m.ndim == 4 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 3 or m.size == 0:
        raise ValueError(f"expected a (D, H, W) localisation map, got shape {m.shape}")
    return m.reshape(m.shape[0], -1).max(axis=1)


def affected_cells(profile: np.ndarray, threshold: float = CELL_THRESHOLD) -> tuple[int, int]:
    """First and last map slice at or above `threshold` (both included); the strongest one
    alone when none reaches it."""
    hits = np.flatnonzero(profile >= threshold)
    if len(hits) == 0:
        peak = int(np.argmax(profile))
        return peak, peak
    return int(hits[0]), int(hits[-1])


def cells_to_slices(first: int, last: int, cells: int, crop: SliceCrop) -> tuple[int, int]:
    """Map slices [first, last] of a map `cells` deep → series slices (inclusive indices).

    The map's slices divide the model input's depth evenly, and the model input is the
    crop's n = stop - start series slices resampled linearly, so map slice j covers the
    series' continuous slice coordinates [start + j n / cells, start + (j + 1) n / cells):
    every series slice that interval touches is in the range.
    """
    if not (0 <= first <= last < cells):
        raise ValueError(f"map slices {first}..{last} outside a map {cells} deep")
    n = crop.stop - crop.start
    lo = crop.start + math.floor(first * n / cells + 1e-9)
    hi = crop.start + math.ceil((last + 1) * n / cells - 1e-9) - 1
    return max(crop.start, lo), min(crop.stop - 1, max(hi, lo))


def slice_range(first: int, last: int, geometry: SeriesGeometry) -> SliceRange:
    """Series slices first..last (indices along the normal) as the finding states them."""
    a, b = geometry.instance_numbers[first], geometry.instance_numbers[last]
    numbered = a is not None and b is not None
    return SliceRange(
        first_instance_number=a if numbered else None,
        last_instance_number=b if numbered else None,
        first_position_mm=round(geometry.positions_mm[first], 3),
        last_position_mm=round(geometry.positions_mm[last], 3),
        slices=last - first + 1,
    )


def localise(
    maps: Mapping[str, np.ndarray],
    geometry: object,
    positive: bool,
    threshold: float | None = None,
) -> SliceRange | None:
    """The slice range of a finding, from the model's multi-value outputs; None for a
    negative finding, a model without `localisation_map` or a series without slice
    geometry (None, or another model's kind: processors.model_inputs.ModelGeometry).
    `threshold`: the rule's localisation_threshold, CELL_THRESHOLD when it has none."""
    cell_map = maps.get(LOCALISATION_OUTPUT)
    if not positive or cell_map is None or not isinstance(geometry, SeriesGeometry):
        return None
    profile = slice_profile(cell_map)
    first, last = affected_cells(profile, CELL_THRESHOLD if threshold is None else threshold)
    return slice_range(*cells_to_slices(first, last, len(profile), geometry.crop), geometry)
