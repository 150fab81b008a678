"""A loaded image volume: voxels in HU plus where they are in the patient.

What every model's input is built from (processors/dicom_volume.load_series makes one
from a CT series; the radiograph and mammogram loaders make theirs), and the geometry
that turns a voxel index back into patient millimetres and slices a viewer shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Volume:
    hu: np.ndarray  # (z, y, x) float32, ordered along the slice normal
    spacing_zyx: tuple[float, float, float]  # mm: slice spacing from positions, then PixelSpacing
    study_uid: str
    series_uid: str
    n_instances: int
    # Per slice of `hu`, in its order: the position along the slice normal (mm; for an axial
    # series the patient z) and the instance's InstanceNumber (None where the sender left
    # it empty) — what turns a slice index back into something a viewer shows.
    positions_mm: tuple[float, ...] = ()
    instance_numbers: tuple[int | None, ...] = ()
    # Voxel index (z, y, x, 1) of `hu` -> DICOM patient coordinates (x, y, z, 1) in mm (LPS),
    # 4 x 4 float64: what places a finding in the patient (a nodule's centre), not only on a
    # slice. Columns: slice step (normal x slice spacing), row step (column direction cosines
    # x row spacing), column step (row direction cosines x column spacing), first slice's
    # ImagePositionPatient. None for a volume not made by `load_series`.
    affine: np.ndarray | None = field(default=None, compare=False, repr=False)
    # A volume loaded onto a coarser working grid (`load_series(..., pool=...)`): its (z, y, x)
    # pooling factors, and the series' own per-slice tables, ascending along the normal, which
    # its slices index: slice i of `hu` averages series slices series_slices(i, i + 1). Then
    # `positions_mm` are the pooled slices' (mean) positions and `instance_numbers` None (a
    # pooled slice is no instance); what a finding names comes from the series' tables.
    # Empty tables: `positions_mm` and `instance_numbers` are the series' own.
    pool_zyx: tuple[int, int, int] = (1, 1, 1)
    source_positions_mm: tuple[float, ...] = ()
    source_instance_numbers: tuple[int | None, ...] = ()

    @property
    def series_positions_mm(self) -> tuple[float, ...]:
        """Position along the normal of every slice of the series (not of `hu`), ascending."""
        return self.source_positions_mm or self.positions_mm

    @property
    def series_instance_numbers(self) -> tuple[int | None, ...]:
        """InstanceNumber of every slice of the series, in `series_positions_mm` order."""
        return self.source_instance_numbers if self.source_positions_mm else self.instance_numbers

    def series_slices(self, start: int, stop: int) -> tuple[int, int]:
        """Slices [start, stop) of `hu` → the series slices [first, end) they were averaged from."""
        kz = self.pool_zyx[0]
        n = len(self.series_positions_mm) or self.hu.shape[0]
        return min(start * kz, n), min(stop * kz, n)

    def to_patient(self, index_zyx: np.ndarray | Sequence[float]) -> np.ndarray:
        """Patient (x, y, z) mm of voxel indices (..., 3 as z, y, x; fractional is fine)."""
        if self.affine is None:
            raise ValueError("this volume carries no patient geometry (not loaded by load_series)")
        return voxel_to_patient(self.affine, index_zyx)


def voxel_to_patient(affine: np.ndarray, index_zyx: np.ndarray | Sequence[float]) -> np.ndarray:
    """Apply a (z, y, x) index -> patient (x, y, z) mm affine to (..., 3) indices."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4 x 4, got {a.shape}")
    idx = np.asarray(index_zyx, dtype=np.float64)
    if idx.shape[-1:] != (3,):
        raise ValueError(f"indices must end in (z, y, x), got shape {idx.shape}")
    return idx @ a[:3, :3].T + a[:3, 3]


def series_affine(
    first_position: Sequence[float] | np.ndarray,
    orientation: Sequence[float] | np.ndarray,
    spacing_zyx: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """The (z, y, x) index -> patient (x, y, z) affine of an image stack: slice 0 at
    `first_position` (its ImagePositionPatient), ImageOrientationPatient `orientation`
    (row direction, then column direction), slices along row x column."""
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    normal = np.cross(row_dir, col_dir)
    dz, dy, dx = (float(s) for s in spacing_zyx)
    a = np.eye(4)
    # Index z steps along the normal, y down the rows (column direction), x along a row.
    a[:3, 0], a[:3, 1], a[:3, 2] = normal * dz, col_dir * dy, row_dir * dx
    a[:3, 3] = np.asarray(first_position, float)
    return a


def centred_affine(shape_zyx: Sequence[int], spacing_zyx: Sequence[float]) -> np.ndarray:
    """The affine of an array as `models.dicom_writer.write_ct_series` writes it (axial, HFS
    identity orientation, the volume's centre at the patient origin): the geometry a plain
    HU array is given when it never went through DICOM (training phantoms)."""
    half = (np.asarray(shape_zyx[:3], float) - 1) / 2 * np.asarray(spacing_zyx, float)
    return series_affine((-half[2], -half[1], -half[0]), (1, 0, 0, 0, 1, 0), spacing_zyx)
