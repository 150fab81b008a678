"""What a model localises, as a DICOM Segmentation (SEG) on the source series (issue 18).

Pure: a `Finding`, the headers of the source series' instances and, for the ICH
classifier, its stored localisation map (processors/localisation_map.py) in; a pydicom
Dataset out, built with highdicom (docs/ARCHITECTURE.md, "Results to the PACS"):

- BINARY, in the source series' frame of reference: each frame is one source slice,
  same rows, columns and geometry, so a viewer overlays it without resampling. Only the
  slices with something on them are frames (and only they are its source images):
  memory is bounded by the segmented slices, never the whole series, and nothing is held
  as float;
- ICH: one segment "Intracranial hemorrhage" (SNOMED CT 1386000): the map's cells at or
  above the threshold the finding's slice range was read with, each cell painted onto
  the series pixels whose centre it covers and onto the series slices its map slice
  touches (the rule the slice range is read with, so the first and last frames are the
  range's ends). Coarse: a cell is 2 model slices by 4 x 4 model pixels (~8 mm x 8 mm
  in-plane for a 200 mm head, 8-9 mm along z), a block, not an outline;
- lung nodules: one segment per nodule, a sphere of its diameter at its centre,
  rasterised on the slices it crosses. One per nodule, not one "Nodule" segment: each is
  a candidate the radiologist accepts or dismisses on its own (a viewer lists and
  toggles segments), its tracking UID is the one of its SR measurement group (the SEG
  segment and the SR's SCOORD3D point name the same nodule), and two touching nodules
  stay two;
- the algorithm (name, version, source radtriage, the threshold) as the segments'
  Algorithm Identification Sequence (TID 4019's attributes).

UIDs are derived like the SR's (processors/dicom_results.py): per (study, finding,
model, model version, request), so a retry sends the same instance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from processors.dicom_results import (
    device_uid,
    finding_concept,
    finding_uids,
    result_uid,
    sr_uids,
    stamp_creation,
)
from processors.localisation import PlaneField
from processors.localisation_map import StoredMap, frame_mask, marked_cells, series_slices_marked
from processors.result_marker import MANUFACTURER, RESULTS_MODEL_NAME
from schemas.findings import Finding, LungNodule

SEG_SERIES_NUMBER = 9902
SEG_SERIES_DESCRIPTION = "AI triage segmentation - not for diagnostic use"
NODULE = hd.sr.CodedConcept("27925004", "SCT", "Nodule")
# A source slice is the map's series slice k when their positions agree this closely (mm):
# both are read from the same headers, only rounding separates them.
_POSITION_TOLERANCE_MM = 0.05
# Display colours (CIELab): ICH red, nodules yellow.
_RED = hd.color.CIELabColor(53.2, 80.1, 67.2)
_YELLOW = hd.color.CIELabColor(97.1, -21.6, 94.5)


class SegError(ValueError):
    """A finding whose SEG cannot be built (sources without geometry, say)."""


def seg_uids(finding: Finding) -> tuple[str, str]:
    """(series, SOP instance) UIDs of the finding's SEG."""
    return finding_uids(finding, "seg")


def nothing_to_segment(finding: Finding, cell_map: StoredMap | None) -> str | None:
    """Why this finding gets no SEG, or None when it has something localised."""
    if not finding.positive:
        return "negative finding"
    if finding.nodules:
        return None
    if cell_map is not None:
        return None
    if finding.localisation_map_uri:
        return "its localisation map is not readable"
    return "its model localises nothing in-plane (no nodules, no localisation map)"


@dataclass(frozen=True)
class _Slice:
    """A source slice's geometry (single-frame instances)."""

    header: Dataset
    position: float  # along the slice normal, mm
    origin: np.ndarray  # ImagePositionPatient (centre of the first pixel), mm
    row_dir: np.ndarray  # direction of increasing column index
    col_dir: np.ndarray  # direction of increasing row index
    spacing: tuple[float, float]  # (between rows, between columns), mm
    rows: int
    cols: int


def _slices(sources: Sequence[Dataset]) -> list[_Slice]:
    out = []
    for ds in sources:
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise SegError(
                f"instance {ds.SOPInstanceUID} is multi-frame: only single-frame series are segmented"
            )
        iop, ipp, ps = (
            ds.get("ImageOrientationPatient"),
            ds.get("ImagePositionPatient"),
            ds.get("PixelSpacing"),
        )
        if iop is None or ipp is None or ps is None or len(iop) != 6 or len(ipp) != 3 or len(ps) != 2:
            raise SegError(f"instance {ds.SOPInstanceUID} has no plane geometry")
        row_dir, col_dir = np.array(iop[:3], dtype=float), np.array(iop[3:], dtype=float)
        origin = np.array(ipp, dtype=float)
        normal = np.cross(row_dir, col_dir)
        out.append(
            _Slice(
                ds,
                float(normal @ origin),
                origin,
                row_dir,
                col_dir,
                (float(ps[0]), float(ps[1])),
                int(ds.Rows),
                int(ds.Columns),
            )
        )
    if not out:
        raise SegError("no source instance to segment on")
    frames = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in sources}
    if len(frames) != 1 or "" in frames:
        raise SegError(f"source instances in {len(frames)} frames of reference (or none): {sorted(frames)}")
    return sorted(out, key=lambda s: s.position)


# Index into the sorted source slices → what paints a segment's mask on that slice's
# (rows, cols) frame. Painted straight into the SEG's pixel array: no mask per slice is
# held besides it (a 0.625 mm series' bleed is a hundred frames of 512 x 512).
Painters = dict[int, Callable[[np.ndarray], None]]


def _paint_cells(cells: np.ndarray, field: PlaneField) -> Callable[[np.ndarray], None]:
    def paint(frame: np.ndarray) -> None:
        frame |= frame_mask(cells, field, frame.shape[0], frame.shape[1])

    return paint


def _ich_masks(slices: Sequence[_Slice], cell_map: StoredMap) -> Painters:
    """The map's painters: on each source slice a map slice touches, its marked cells."""
    g = cell_map.geometry
    assert g.field is not None  # a StoredMap has one
    by_series = series_slices_marked(cell_map, marked_cells(cell_map))
    positions = np.array([s.position for s in slices])
    out: Painters = {}
    for k, cells in sorted(by_series.items()):
        if k >= len(g.positions_mm):
            raise SegError(f"map slice {k} past the series' {len(g.positions_mm)} slices")
        i = int(np.argmin(np.abs(positions - g.positions_mm[k])))
        if abs(positions[i] - g.positions_mm[k]) > _POSITION_TOLERANCE_MM:
            raise SegError(
                f"no source instance at {g.positions_mm[k]:.3f} mm (the map's series slice {k}): "
                "the stored series is not the one the model read"
            )
        if frame_mask(cells, g.field, slices[i].rows, slices[i].cols).any():  # a field inside the image
            out[i] = _paint_cells(cells, g.field)
    return out


def _paint_box(r0: int, c0: int, inside: np.ndarray) -> Callable[[np.ndarray], None]:
    def paint(frame: np.ndarray) -> None:
        frame[r0 : r0 + inside.shape[0], c0 : c0 + inside.shape[1]] |= inside

    return paint


def _sphere_masks(slices: Sequence[_Slice], nodule: LungNodule) -> Painters:
    """The nodule's painters: on each source slice it crosses, the pixels whose centre is
    within the sphere. A nodule thinner than the slice gap still shows on the slice nearest
    its centre, with its full radius (its equator is between two slices)."""
    centre = np.array(nodule.centre_lps_mm, dtype=float)
    radius = nodule.diameter_mm / 2.0
    distances = []
    for s in slices:
        normal = np.cross(s.row_dir, s.col_dir)
        distances.append(float(normal @ (centre - s.origin)))
    nearest = int(np.argmin(np.abs(distances)))
    out: Painters = {}
    for i, (s, d) in enumerate(zip(slices, distances, strict=True)):
        if abs(d) > radius and i != nearest:
            continue
        disc = math.sqrt(max(radius * radius - d * d, 0.0)) if abs(d) <= radius else radius
        # The centre projected onto the slice, in (fractional) row and column indices.
        offset = centre - s.origin
        col_c, row_c = float(s.row_dir @ offset) / s.spacing[1], float(s.col_dir @ offset) / s.spacing[0]
        # Only the bounding box of the disc is computed: a 30 mm nodule is ~60 x 60 pixels.
        r0 = max(0, math.floor(row_c - disc / s.spacing[0]))
        r1 = min(s.rows, math.ceil(row_c + disc / s.spacing[0]) + 1)
        c0 = max(0, math.floor(col_c - disc / s.spacing[1]))
        c1 = min(s.cols, math.ceil(col_c + disc / s.spacing[1]) + 1)
        if r0 >= r1 or c0 >= c1:
            continue  # outside the image
        rr = (np.arange(r0, r1) - row_c)[:, None] * s.spacing[0]
        cc = (np.arange(c0, c1) - col_c)[None, :] * s.spacing[1]
        inside = rr * rr + cc * cc <= disc * disc
        if not inside.any():  # a disc smaller than a pixel: its nearest pixel
            inside[np.unravel_index(np.argmin(rr * rr + cc * cc), inside.shape)] = True
        out[i] = _paint_box(r0, c0, inside)
    return out


def _algorithm(finding: Finding, threshold: float) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=finding.model_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=finding.model_version or "unknown",
        source=MANUFACTURER,
        parameters={"threshold": f"{threshold:g}"},
    )


def _segments(
    finding: Finding, slices: Sequence[_Slice], cell_map: StoredMap | None
) -> list[tuple[hd.seg.SegmentDescription, Painters]]:
    """One entry per segment: its description and its masks by slice (the localisation
    map's cells, then each nodule's sphere)."""
    segments: list[tuple[hd.seg.SegmentDescription, Painters]] = []
    if cell_map is not None:
        concept = finding_concept(finding)
        description = hd.seg.SegmentDescription(
            segment_number=1,
            segment_label=concept.meaning[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=concept,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(finding, cell_map.threshold),
            tracking_uid=sr_uids(finding).tracking_uid,
            tracking_id=f"{finding.finding} ({finding.model_name})",
            display_color=_RED,
        )
        segments.append((description, _ich_masks(slices, cell_map)))
    for n, nodule in enumerate(finding.nodules or ()):
        description = hd.seg.SegmentDescription(
            segment_number=len(segments) + 1,
            segment_label=f"Nodule {n + 1}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=NODULE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(finding, finding.threshold),
            # The SR's measurement group of this nodule (processors/dicom_results._nodule_group).
            tracking_uid=result_uid("nodule", sr_uids(finding).sop_uid, str(n)),
            tracking_id=f"nodule {n + 1}",
            display_color=_YELLOW,
        )
        segments.append((description, _sphere_masks(slices, nodule)))
    return segments


def _painted(
    finding: Finding, slices: Sequence[_Slice], segments: list[tuple[hd.seg.SegmentDescription, Painters]]
) -> tuple[list[int], np.ndarray]:
    """The source slices any segment touches, and (frames, rows, cols, segments) masks on
    them, one byte a pixel: the segmented slices only."""
    used = sorted({i for _, masks in segments for i in masks})
    if not used:
        raise SegError(f"no SEG for {finding.study_uid}: nothing it localises falls on a source slice")
    shapes = {(slices[i].rows, slices[i].cols) for i in used}
    if len(shapes) != 1:
        raise SegError(f"segmented source slices of several sizes: {sorted(shapes)}")
    rows, cols = shapes.pop()
    pixels = np.zeros((len(used), rows, cols, len(segments)), dtype=bool)
    for f, i in enumerate(used):
        for s, (_, painters) in enumerate(segments):
            if i in painters:
                painters[i](pixels[f, :, :, s])
    return used, pixels


def build_seg(
    finding: Finding,
    sources: Sequence[Dataset],
    cell_map: StoredMap | None = None,
    software_version: str = "",
) -> Dataset:
    """The finding's SEG on `sources` (headers of the series the model read, pixel data not
    needed). Raises SegError when there is nothing to segment or no geometry to put it on."""
    why_not = nothing_to_segment(finding, cell_map)
    if why_not is not None:
        raise SegError(f"no SEG for {finding.study_uid}: {why_not}")
    others = {str(ds.StudyInstanceUID) for ds in sources} - {finding.study_uid}
    if others:
        raise SegError(f"source instances of other studies: {sorted(others)}")
    slices = _slices(sources)
    segments = _segments(finding, slices, cell_map)
    used, pixels = _painted(finding, slices, segments)
    series_uid, sop_uid = seg_uids(finding)
    inferred = finding.inferred_at
    seg = hd.seg.Segmentation(
        source_images=[slices[i].header for i in used],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[d for d, _ in segments],
        series_instance_uid=series_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=RESULTS_MODEL_NAME,
        software_versions=software_version or finding.model_version or "unknown",
        device_serial_number=device_uid(finding),
        content_label="AI_TRIAGE",
        content_description=f"{finding.model_name} {finding.model_version}".strip()[:64],
        series_description=SEG_SERIES_DESCRIPTION,
        omit_empty_frames=True,
        # The finding's time, not the build's: a retry builds the same content.
        content_date=inferred.date(),
        content_time=inferred.time().replace(tzinfo=None),
        series_date=inferred.date(),
        series_time=inferred.time().replace(tzinfo=None),
    )
    # highdicom draws a random Dimension Organization UID; derived instead, a retry is
    # byte-identical (as the SR's).
    organisation = result_uid("seg-dimensions", sop_uid)
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = organisation
    stamp_creation(seg, inferred)
    return seg
