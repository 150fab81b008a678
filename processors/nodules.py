"""Lung nodules from the nodule model's map: where they are in the patient, how big, how sure.

The nodule detector (models/nodule_detector/net.py) serves `nodule_map`: per voxel of its fixed
input grid (processors.preprocessing.NODULE_INPUT_SHAPE, ~2.5 mm isotropic, axes along
patient z, y, x), P(this voxel is nodule). The model's grid is a resampling of the
series, so a map voxel means something in the patient only through the preprocessing's
`NoduleGeometry` (an affine from map index to DICOM patient LPS mm, small and picklable:
it travels back from the preprocessing process with the tensor, as the ICH model's
`SeriesGeometry` does).

`find_nodules` is pure and light (numpy + scipy, no torch: the stream worker imports it):
connected components of the map at the threshold, each reported with

* its centre: the probability-weighted centroid of the component, in patient mm;
* its diameter: that of the sphere whose volume is the component's summed probability
  (plus the one-voxel rim just below the threshold) times the voxel volume. A calibrated
  map's probabilities are the fraction of each voxel the nodule fills, so the sum is
  the nodule's volume whatever the threshold; counting voxels above a threshold instead
  rounds a 6 mm nodule (14 voxels of 2.5 mm) to whatever the threshold happens to cut;
* its probability: the component's peak.

Sorted by probability, at most MAX_NODULES (a triage report lists the likeliest few).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from schemas.findings import LungNodule

NODULE_OUTPUT = "nodule_map"
MAX_NODULES = 10
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connected: a diagonal neighbour is the same nodule


@dataclass(frozen=True)
class NoduleGeometry:
    """Map voxel index (z, y, x) -> DICOM patient (x, y, z) mm, for a map of `map_shape`."""

    affine: tuple[tuple[float, float, float, float], ...]  # 4 x 4, rows; last row 0 0 0 1
    map_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        a = np.asarray(self.affine, dtype=np.float64)
        if a.shape != (4, 4) or not np.all(np.isfinite(a)):
            raise ValueError(f"NoduleGeometry.affine must be a finite 4 x 4 matrix, got shape {a.shape}")
        if not np.allclose(a[3], (0, 0, 0, 1)) or abs(float(np.linalg.det(a[:3, :3]))) < 1e-9:
            raise ValueError("NoduleGeometry.affine is not an invertible affine (last row must be 0 0 0 1)")
        if len(self.map_shape) != 3 or min(self.map_shape) < 1:
            raise ValueError(f"NoduleGeometry.map_shape must be three positive sizes, got {self.map_shape}")

    @classmethod
    def from_matrix(cls, affine: np.ndarray, map_shape: Sequence[int]) -> NoduleGeometry:
        rows = tuple(tuple(float(v) for v in row) for row in np.asarray(affine, dtype=np.float64))
        return cls(rows, (int(map_shape[0]), int(map_shape[1]), int(map_shape[2])))  # type: ignore[arg-type]

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.affine, dtype=np.float64)

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        """Size of a map voxel along its (z, y, x) axes."""
        n = np.linalg.norm(self.matrix[:3, :3], axis=0)
        return float(n[0]), float(n[1]), float(n[2])

    @property
    def voxel_volume_mm3(self) -> float:
        return abs(float(np.linalg.det(self.matrix[:3, :3])))

    def to_patient(self, index_zyx: np.ndarray | Sequence[float]) -> np.ndarray:
        """Patient (x, y, z) mm of map indices (..., 3 as z, y, x; fractional is fine)."""
        idx = np.asarray(index_zyx, dtype=np.float64)
        m = self.matrix
        return idx @ m[:3, :3].T + m[:3, 3]

    def to_index(self, lps_mm: np.ndarray | Sequence[float]) -> np.ndarray:
        """Map indices (..., 3 as z, y, x) of patient (x, y, z) mm points: the inverse."""
        p = np.asarray(lps_mm, dtype=np.float64)
        m = np.linalg.inv(self.matrix)
        return p @ m[:3, :3].T + m[:3, 3]


@dataclass(frozen=True)
class DetectedNodule:
    centre_lps_mm: tuple[float, float, float]  # DICOM patient x, y, z
    diameter_mm: float  # of the sphere with the map's volume for this nodule
    probability: float  # the component's peak
    map_index_zyx: tuple[float, float, float]  # the centre on the map grid
    voxels: int  # map voxels at or above the threshold


def _as_map(nodule_map: np.ndarray) -> np.ndarray:
    m = np.asarray(nodule_map)
    while m.ndim > 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 3 or m.size == 0:
        raise ValueError(
            "expected a nodule map (D, H, W), (1, D, H, W) or (1, 1, D, H, W), "
            f"got shape {np.shape(nodule_map)}"
        )
    if not np.issubdtype(m.dtype, np.number) or np.issubdtype(m.dtype, np.complexfloating):
        raise ValueError(f"nodule map must be real numbers, got dtype {m.dtype}")
    m = m.astype(np.float32, copy=False)
    if not np.isfinite(m).all():
        raise ValueError("nodule map contains NaN or infinity")
    if m.min() < -1e-6 or m.max() > 1 + 1e-6:
        raise ValueError(
            f"nodule map must hold probabilities in [0, 1], got [{m.min():.3g}, {m.max():.3g}] (logits?)"
        )
    return np.clip(m, 0.0, 1.0)


def find_nodules(
    nodule_map: np.ndarray,
    geometry: NoduleGeometry,
    threshold: float,
    max_nodules: int = MAX_NODULES,
) -> list[DetectedNodule]:
    """The nodules of one study's map at `threshold` (in (0, 1]), likeliest first."""
    if not isinstance(geometry, NoduleGeometry):
        raise ValueError(f"geometry must be a NoduleGeometry, got {type(geometry).__name__}")
    if not (isinstance(threshold, int | float) and 0.0 < float(threshold) <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if max_nodules < 1:
        raise ValueError(f"max_nodules must be positive, got {max_nodules}")
    m = _as_map(nodule_map)
    if m.shape != tuple(geometry.map_shape):
        raise ValueError(f"map shape {m.shape} differs from the geometry's {tuple(geometry.map_shape)}")
    labels, n = ndimage.label(m >= threshold, structure=_CONNECTIVITY)
    if n == 0:
        return []
    voxel_volume = geometry.voxel_volume_mm3
    found: list[DetectedNodule] = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        # One voxel of margin: the rim below the threshold is part of the nodule's volume.
        grown = tuple(
            slice(max(s.start - 1, 0), min(s.stop + 1, size)) for s, size in zip(box, m.shape, strict=True)
        )
        local_labels, local_map = labels[grown], m[grown]
        core = local_labels == label
        rim = ndimage.binary_dilation(core, structure=_CONNECTIVITY) & (local_labels == 0)
        weights = np.where(core | rim, local_map, 0.0)
        total = float(weights.sum())
        zz, yy, xx = np.nonzero(core)
        w_core = local_map[core].astype(np.float64)
        offset = np.array([s.start for s in grown], dtype=np.float64)
        centre = np.array([zz @ w_core, yy @ w_core, xx @ w_core]) / max(float(w_core.sum()), 1e-12) + offset
        lps = geometry.to_patient(centre)
        diameter = (6.0 * total * voxel_volume / math.pi) ** (1.0 / 3.0)
        found.append(
            DetectedNodule(
                centre_lps_mm=(round(float(lps[0]), 2), round(float(lps[1]), 2), round(float(lps[2]), 2)),
                diameter_mm=round(float(diameter), 2),
                probability=round(float(local_map[core].max()), 5),
                map_index_zyx=(float(centre[0]), float(centre[1]), float(centre[2])),
                voxels=int(core.sum()),
            )
        )
    found.sort(key=lambda d: (-d.probability, -d.diameter_mm))
    return found[:max_nodules]


def lung_of(centre_lps_mm: Sequence[float]) -> Literal["left", "right"]:
    """The lung a centre is in: DICOM patient +x is the patient's left."""
    return "left" if float(centre_lps_mm[0]) > 0.0 else "right"


def nodules_of(
    maps: Mapping[str, np.ndarray], geometry: object, threshold: float, positive: bool
) -> tuple[LungNodule, ...] | None:
    """A finding's nodules from a response's multi-value outputs: None for models without
    `nodule_map`; () for a negative study. Raises ValueError for a map or geometry that
    cannot be read, and for a positive study whose map has no nodule at the threshold
    (the probability is the map's peak, so that is a malformed response)."""
    nodule_map = maps.get(NODULE_OUTPUT)
    if nodule_map is None:
        return None
    if not isinstance(geometry, NoduleGeometry):
        raise ValueError(f"a nodule map needs the series' NoduleGeometry, got {type(geometry).__name__}")
    if not positive:
        return ()
    found = find_nodules(nodule_map, geometry, threshold)
    if not found:
        raise ValueError(f"positive at threshold {threshold} but the nodule map has no voxel at or above it")
    return tuple(
        # find_nodules' map is clipped to [0, 1] and a component's voxels are >= the
        # threshold (> 0), so the probability and diameter are in the schema's ranges.
        LungNodule(
            centre_lps_mm=n.centre_lps_mm,
            diameter_mm=n.diameter_mm,
            probability=n.probability,
            lung=lung_of(n.centre_lps_mm),
        )
        for n in found
    )
