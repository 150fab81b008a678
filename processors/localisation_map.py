"""A localisation map kept for the DICOM SEG: the ICH blood map, small, with what maps its
cells back onto the series' slices and pixels (issue 18; docs/ARCHITECTURE.md, "Results
to the PACS").

The infer stage keeps a positive finding's map (Triton output `localisation_map`, (16,
24, 24) cells for the reference ICH weights) in the blob store next to the study, and
the finding names it (`Finding.localisation_map_uri`); the pacs-export stage reads it
back to build the SEG (processors/dicom_seg.py). Pure: bytes in, bytes out.

What is kept: each cell's probability quantised to a byte (9 kB for the reference map),
quantised so the threshold comparison is exactly the float one (a cell at or above the
threshold stays at or above its level, one below stays below), so the SEG marks exactly
the cells the finding's slice range was read from; the map slices [first, last] that
range was read from (processors/localisation.affected_cells); and the series geometry
(the slice crop, the series' slice positions, the in-plane field of the model input).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from processors.localisation import (
    CELL_THRESHOLD,
    LOCALISATION_OUTPUT,
    PlaneField,
    SeriesGeometry,
    SliceCrop,
    affected_cells,
    cells_to_slices,
    slice_profile,
)

FORMAT = "radtriage.localisation-map/1"
LEVELS = 255
# At most this many cells (the reference map has 9216): what a stored map may hold, so a
# malformed model output cannot make the blob store or the SEG builder hold gigabytes.
MAX_CELLS = 1 << 20


class MapError(ValueError):
    """A stored map that cannot be read (corrupt, another format, inconsistent)."""


@dataclass(frozen=True)
class StoredMap:
    """A quantised localisation map and its geometry."""

    cells: np.ndarray  # uint8 (D', H', W'): round(probability x 255), threshold-exact
    level: int  # a cell is at or above the threshold exactly when cells >= level
    threshold: float
    first: int  # map slices the finding's slice range was read from, both included
    last: int
    geometry: SeriesGeometry  # with its in-plane field

    def __post_init__(self) -> None:
        if self.cells.ndim != 3 or self.cells.dtype != np.uint8 or self.cells.size > MAX_CELLS:
            raise MapError(f"not a (D, H, W) byte map of at most {MAX_CELLS} cells: {self.cells.shape}")
        if not 0 <= self.first <= self.last < self.cells.shape[0]:
            raise MapError(f"map slices {self.first}..{self.last} outside a map {self.cells.shape[0]} deep")
        if self.geometry.field is None:
            raise MapError("a stored map needs the in-plane field of its model input")


def map_key(request: str) -> str:
    """The blob name of a request's map: deterministic (a replayed request rewrites the same
    file) and path-safe whatever the request id holds (it has slashes)."""
    return hashlib.sha256(request.encode()).hexdigest()


def quantise(cell_map: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """Probabilities → bytes and the threshold's level, with `q >= level` exactly when
    `p >= threshold` (a value off by one level at most)."""
    p = np.clip(np.asarray(cell_map, dtype=np.float32), 0.0, 1.0)
    level = min(LEVELS, math.ceil(threshold * LEVELS))
    q = np.rint(p * LEVELS).astype(np.int16)
    above = p >= np.float32(threshold)
    q = np.where(above, np.maximum(q, level), np.minimum(q, level - 1))
    return np.clip(q, 0, LEVELS).astype(np.uint8), level


def stored_map(
    maps: Mapping[str, np.ndarray], geometry: object, positive: bool, threshold: float | None = None
) -> StoredMap | None:
    """What to keep of a finding's map (`threshold`: the rule's localisation threshold, as
    `localise` was given it); None when there is nothing a SEG could show: a negative
    finding, a model without a map, a series without geometry or without its field."""
    cell_map = maps.get(LOCALISATION_OUTPUT)
    if not positive or cell_map is None or not isinstance(geometry, SeriesGeometry) or geometry.field is None:
        return None
    m = np.asarray(cell_map, dtype=np.float32)
    if m.ndim == 4 and m.shape[0] == 1:
        m = m[0]
    t = CELL_THRESHOLD if threshold is None else threshold
    first, last = affected_cells(slice_profile(m), t)
    cells, level = quantise(m, t)
    return StoredMap(cells, level, t, first, last, geometry)


def marked_cells(stored: StoredMap) -> np.ndarray:
    """(D', H', W') bool: the cells the SEG shows. Those at or above the threshold; for a
    finding whose map stays below it everywhere (its range is the strongest map slice
    alone), that slice's strongest cells."""
    marked = np.zeros(stored.cells.shape, dtype=bool)
    span = stored.cells[stored.first : stored.last + 1]
    hits = span >= stored.level
    if not hits.any():
        hits = span == span.max()
    marked[stored.first : stored.last + 1] = hits
    return marked


def series_slices_marked(stored: StoredMap, marked: np.ndarray) -> dict[int, np.ndarray]:
    """Series slice index → the (H', W') cells marked on it: every map slice that touches
    the series slice (processors/localisation.cells_to_slices, the rule the slice range
    is read with) contributes its cells."""
    depth = marked.shape[0]
    out: dict[int, np.ndarray] = {}
    for j in np.flatnonzero(marked.reshape(depth, -1).any(axis=1)):
        lo, hi = cells_to_slices(int(j), int(j), depth, stored.geometry.crop)
        for s in range(lo, hi + 1):
            out[s] = out[s] | marked[j] if s in out else marked[j].copy()
    return out


def cell_lookup(start: float, stop: float, cells: int, pixels: int) -> np.ndarray:
    """Per pixel of an axis `pixels` long: the cell its centre falls in, -1 outside the field.
    The model input's resize maps the field's edges onto its own (align_corners=False), so
    cell i covers the field's [i, i + 1) x (stop - start) / cells."""
    centres = np.arange(pixels, dtype=np.float64) + 0.5
    index = np.floor((centres - start) * cells / (stop - start)).astype(np.int64)
    return np.where((index >= 0) & (index < cells), index, -1)


def frame_mask(cells_2d: np.ndarray, field: PlaneField, rows: int, cols: int) -> np.ndarray:
    """(H', W') marked cells → (rows, cols) bool on a series slice's pixels."""
    r = cell_lookup(field.row_start, field.row_stop, cells_2d.shape[0], rows)
    c = cell_lookup(field.col_start, field.col_stop, cells_2d.shape[1], cols)
    mask = cells_2d[np.clip(r, 0, None)[:, None], np.clip(c, 0, None)[None, :]]
    mask &= (r >= 0)[:, None] & (c >= 0)[None, :]
    return mask


def to_bytes(stored: StoredMap) -> bytes:
    """JSON (no pickle: the blob store is read by another process)."""
    g = stored.geometry
    assert g.field is not None  # checked by StoredMap
    return json.dumps(
        {
            "format": FORMAT,
            "shape": list(stored.cells.shape),
            "cells": base64.b64encode(stored.cells.tobytes()).decode("ascii"),
            "level": stored.level,
            "threshold": stored.threshold,
            "first": stored.first,
            "last": stored.last,
            "crop": [g.crop.start, g.crop.stop, g.crop.depth],
            "positions_mm": list(g.positions_mm),
            "instance_numbers": list(g.instance_numbers),
            "field": [g.field.row_start, g.field.row_stop, g.field.col_start, g.field.col_stop],
        },
        separators=(",", ":"),
    ).encode()


def from_bytes(data: bytes) -> StoredMap:
    try:
        doc = json.loads(data)
        if doc.get("format") != FORMAT:
            raise MapError(f"not a {FORMAT} map: format {doc.get('format')!r}")
        shape = tuple(int(n) for n in doc["shape"])
        if len(shape) != 3 or math.prod(shape) > MAX_CELLS:
            raise MapError(f"map shape {shape}")
        raw = base64.b64decode(doc["cells"], validate=True)
        if len(raw) != math.prod(shape):
            raise MapError(f"{len(raw)} cells for a map shaped {shape}")
        geometry = SeriesGeometry(
            SliceCrop(*(int(v) for v in doc["crop"])),
            tuple(float(v) for v in doc["positions_mm"]),
            tuple(None if v is None else int(v) for v in doc["instance_numbers"]),
            PlaneField(*(float(v) for v in doc["field"])),
        )
        return StoredMap(
            np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy(),
            int(doc["level"]),
            float(doc["threshold"]),
            int(doc["first"]),
            int(doc["last"]),
            geometry,
        )
    except MapError:
        raise
    except (
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
    ) as exc:  # JSON, base64, the geometry's own checks
        raise MapError(f"unreadable localisation map: {type(exc).__name__}: {exc}") from exc
