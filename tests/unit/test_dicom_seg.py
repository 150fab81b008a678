"""The DICOM SEG of what a model localises (processors/dicom_seg.py) and the stored map it
is drawn from (processors/localisation_map.py): frames on exactly the slices of the
finding's slice range, cells painted where their field says, nodule spheres of the right
size at the right place, the source's frame of reference, parsed back by highdicom and
validated by dicom3tools' dciodvfy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from models.dicom_writer import write_ct_series
from processors.dicom_results import encode, read_headers, sr_uids
from processors.dicom_seg import SegError, build_seg, nothing_to_segment, seg_uids
from processors.localisation import (
    LOCALISATION_OUTPUT,
    PlaneField,
    SeriesGeometry,
    SliceCrop,
    localise,
)
from processors.localisation_map import (
    MapError,
    StoredMap,
    frame_mask,
    from_bytes,
    map_key,
    quantise,
    stored_map,
    to_bytes,
)
from radtriage.blobstore import BlobStoreError, LocalBlobStore
from schemas.findings import Finding, LungNodule
from tests.support.findings import ich_result

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1801", "1.2.826.0.1.3680043.8.498.1801.2"
SLICES, MATRIX = 30, 64
# Series slices [2, 28) onto 16 map slices: 26 / 16 is not whole, so map slices share
# series slices at their edges (the rule the slice range is read with decides).
CROP = SliceCrop(2, 28, 16)
# The model's square field: rows from -2 (padded above the image) to 62, all columns.
FIELD = PlaneField(-2.0, 62.0, 0.0, 64.0)
DCIODVFY = Path("/usr/bin/dciodvfy")


def write_series(folder: Path) -> list[Path]:
    """A 30-slice CT, 5 mm apart, 64 x 64 pixels of 1 mm, InstanceNumbers shuffled."""
    return write_ct_series(
        np.full((SLICES, MATRIX, MATRIX), 40.0),
        (5.0, 1.0, 1.0),
        folder,
        study_uid=STUDY,
        series_uid=SERIES,
        shuffle_files=True,
        rng=np.random.default_rng(18),
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return read_headers(write_series(tmp_path_factory.mktemp("ct")))


def _z(ds: Dataset) -> float:
    return float(ds.ImagePositionPatient[2])


def _geometry(sources: list[Dataset]) -> SeriesGeometry:
    by_z = sorted(sources, key=_z)
    return SeriesGeometry(
        CROP, tuple(_z(ds) for ds in by_z), tuple(int(ds.InstanceNumber) for ds in by_z), FIELD
    )


def _bleed_map() -> np.ndarray:
    """Map slices 5..7, cells rows 10..13, columns 8..11 above the threshold; a weaker
    cell elsewhere stays out."""
    m = np.full((16, 24, 24), 0.05, dtype=np.float32)
    m[5:8, 10:14, 8:12] = 0.9
    m[12, 3, 3] = 0.5
    return m


def _ich(sources: list[Dataset], cell_map: np.ndarray) -> tuple[Finding, StoredMap]:
    """The finding as the infer stage builds it (its slice range by `localise`) and the map
    as the pacs-export stage reads it back (through bytes)."""
    geometry = _geometry(sources)
    maps = {LOCALISATION_OUTPUT: cell_map}
    finding = ich_result(STUDY, SERIES, slice_range=localise(maps, geometry, True), localisation_map_uri="x")
    kept = stored_map(maps, geometry, True)
    assert kept is not None
    return finding, from_bytes(to_bytes(kept))


def _parsed(seg: Dataset) -> hd.seg.Segmentation:
    return hd.seg.Segmentation.from_dataset(pydicom.dcmread(DicomBytesIO(encode(seg))))


def _frame_z(seg: hd.seg.Segmentation) -> list[float]:
    return sorted(
        float(f.PlanePositionSequence[0].ImagePositionPatient[2])
        for f in seg.PerFrameFunctionalGroupsSequence
    )


def test_ich_frames_are_exactly_the_slices_of_the_slice_range(sources: list[Dataset]) -> None:
    finding, kept = _ich(sources, _bleed_map())
    assert finding.slice_range is not None
    seg = _parsed(build_seg(finding, sources, kept))
    in_range = sorted(
        _z(ds)
        for ds in sources
        if finding.slice_range.first_position_mm <= _z(ds) <= finding.slice_range.last_position_mm
    )
    assert len(in_range) == finding.slice_range.slices
    assert _frame_z(seg) == pytest.approx(in_range)
    # The source images are the segmented slices, referenced by the series' own UIDs.
    (series_ref,) = seg.ReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == SERIES
    referenced = {str(r.ReferencedSOPInstanceUID) for r in series_ref.ReferencedInstanceSequence}
    assert referenced == {str(ds.SOPInstanceUID) for ds in sources if _z(ds) in in_range}


def test_a_map_shifted_by_one_slice_moves_the_frames(sources: list[Dataset]) -> None:
    finding, _ = _ich(sources, _bleed_map())
    _, shifted = _ich(sources, np.roll(_bleed_map(), 1, axis=0))
    seg = _parsed(build_seg(finding, sources, shifted))
    assert finding.slice_range is not None
    assert min(_frame_z(seg)) > finding.slice_range.first_position_mm


def test_ich_cells_are_painted_on_the_pixels_their_field_covers(sources: list[Dataset]) -> None:
    finding, kept = _ich(sources, _bleed_map())
    seg = _parsed(build_seg(finding, sources, kept))
    pixels = seg.pixel_array  # (frames, rows, cols)
    rows, cols = np.nonzero(pixels.any(axis=0))
    # A cell is 64 / 24 pixels; rows start 2 above the image: cell rows 10..13 cover pixel
    # centres in [-2 + 10 x 8/3, -2 + 14 x 8/3) = [24.67, 35.33): rows 25..34 (r + 0.5).
    assert (rows.min(), rows.max()) == (25, 34)
    # Columns 8..11: [21.33, 32) → columns 21..31.
    assert (cols.min(), cols.max()) == (21, 31)
    assert all(frame.any() for frame in pixels)


def test_frame_mask_clips_a_field_past_the_image() -> None:
    cells = np.ones((4, 4), dtype=bool)
    mask = frame_mask(cells, PlaneField(-10.0, 30.0, 5.0, 45.0), 20, 20)
    assert mask[:, :5].sum() == 0 and mask[:, 5:].all()


def test_below_threshold_everywhere_the_strongest_cells_of_the_range(sources: list[Dataset]) -> None:
    m = np.full((16, 24, 24), 0.1, dtype=np.float32)
    m[9, 4, 4] = 0.6  # below CELL_THRESHOLD (0.75): the range is map slice 9 alone
    finding, kept = _ich(sources, m)
    seg = _parsed(build_seg(finding, sources, kept))
    assert finding.slice_range is not None
    assert _frame_z(seg)[0] == pytest.approx(finding.slice_range.first_position_mm)
    assert _frame_z(seg)[-1] == pytest.approx(finding.slice_range.last_position_mm)
    # One cell, 8/3 pixels a side: rows [8.67, 11.33) and columns [10.67, 13.33) hold the
    # centres of rows 9-10 and columns 11-12.
    assert list(zip(*np.nonzero(seg.pixel_array.any(axis=0)), strict=True)) == [
        (9, 11),
        (9, 12),
        (10, 11),
        (10, 12),
    ]


def test_the_seg_is_in_the_sources_frame_of_reference_with_the_finding_coded(sources: list[Dataset]) -> None:
    finding, kept = _ich(sources, _bleed_map())
    seg = _parsed(build_seg(finding, sources, kept, software_version="radtriage 1.0"))
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == STUDY and seg.SegmentationType == "BINARY"
    (segment,) = seg.SegmentSequence
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "1386000"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == "ich_classifier" and algorithm.AlgorithmVersion == "1"
    assert algorithm.AlgorithmSource == "radtriage"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    # The same finding's SR measurement group: one tracking UID for both.
    assert segment.TrackingUID == sr_uids(finding).tracking_uid
    assert seg.Manufacturer == "radtriage"


def test_uids_follow_the_request_so_a_retry_sends_the_same_instance(sources: list[Dataset]) -> None:
    finding, kept = _ich(sources, _bleed_map())
    first, again = build_seg(finding, sources, kept), build_seg(finding, sources, kept)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == seg_uids(finding)
    assert encode(first) == encode(again)
    other = build_seg(finding.model_copy(update={"request_id": "another"}), sources, kept)
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert seg_uids(finding.model_copy(update={"model_version": "2"})) != seg_uids(finding)


def _nodule_finding(nodules: tuple[LungNodule, ...]) -> Finding:
    return ich_result(
        STUDY,
        SERIES,
        finding="NODULE",
        model_name="nodule_detector",
        nodules=nodules,
    )


def test_a_nodule_is_a_sphere_of_its_diameter_around_its_centre(sources: list[Dataset]) -> None:
    # write_ct_series centres the series on the origin: columns at x = -31.5 + c, rows at
    # y = -31.5 + r, slices at z = -72.5 + 5 k. A 12 mm nodule at z = 2.5 crosses the
    # slices at -2.5, 2.5 and 7.5 (|dz| <= 6 mm), 6 mm in radius on its own slice.
    nodule = LungNodule(centre_lps_mm=(0.5, -3.5, 2.5), diameter_mm=12.0, probability=0.8, lung="left")
    seg = _parsed(build_seg(_nodule_finding((nodule,)), sources))
    assert _frame_z(seg) == pytest.approx([-2.5, 2.5, 7.5])
    frames = {
        float(f.PlanePositionSequence[0].ImagePositionPatient[2]): i
        for i, f in enumerate(seg.PerFrameFunctionalGroupsSequence)
    }
    equator = seg.pixel_array[frames[2.5]]
    rows, cols = np.nonzero(equator)
    assert (cols.min(), cols.max()) == (26, 38)  # column 32 ± 6
    assert (rows.min(), rows.max()) == (22, 34)  # row 28 ± 6
    assert equator[28, 32] and int(equator.sum()) == pytest.approx(np.pi * 36, rel=0.1)
    # 5 mm off the centre: a disc of sqrt(36 - 25) = 3.3 mm.
    off = seg.pixel_array[frames[7.5]]
    assert int(off.sum()) == pytest.approx(np.pi * 11, rel=0.25) and off[28, 32]
    (segment,) = seg.SegmentSequence
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"


def test_one_segment_per_nodule_and_a_small_one_still_shows(sources: list[Dataset]) -> None:
    big = LungNodule(centre_lps_mm=(-10.5, 0.5, -20.0), diameter_mm=8.0, probability=0.9, lung="right")
    # 2 mm across, between two slices (2.5 mm from both): still on the nearest slice.
    small = LungNodule(centre_lps_mm=(12.5, 4.5, 30.0), diameter_mm=2.0, probability=0.6, lung="left")
    seg = _parsed(build_seg(_nodule_finding((big, small)), sources))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Nodule 1", "Nodule 2"]
    per_frame = [
        int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    assert per_frame.count(2) == 1 and per_frame.count(1) >= 2


def test_a_negative_finding_or_one_without_localisation_gets_no_seg(sources: list[Dataset]) -> None:
    negative = ich_result(STUDY, SERIES, positive=False, probability=0.1)
    assert nothing_to_segment(negative, None) == "negative finding"
    positive = ich_result(STUDY, SERIES)
    assert nothing_to_segment(positive, None) is not None
    with pytest.raises(SegError, match="no SEG"):
        build_seg(positive, sources)


def test_a_map_of_another_series_is_refused(sources: list[Dataset]) -> None:
    finding, kept = _ich(sources, _bleed_map())
    g = kept.geometry
    moved = StoredMap(
        kept.cells,
        kept.level,
        kept.threshold,
        kept.first,
        kept.last,
        SeriesGeometry(g.crop, tuple(p + 1.0 for p in g.positions_mm), g.instance_numbers, g.field),
    )
    with pytest.raises(SegError, match="not the one the model read"):
        build_seg(finding, sources, moved)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.75, 0.7501, 1.0])
def test_quantising_keeps_the_threshold_comparison_exact(threshold: float) -> None:
    rng = np.random.default_rng(7)
    p = np.concatenate([rng.random(5000), [threshold, np.nextafter(threshold, 0), 0.0, 1.0]]).astype(
        np.float32
    )
    q, level = quantise(p, threshold)
    np.testing.assert_array_equal(q >= level, p >= np.float32(threshold))
    assert np.abs(q.astype(float) - p * 255).max() <= 1.0


def test_a_stored_map_survives_bytes_and_refuses_garbage(sources: list[Dataset]) -> None:
    kept = stored_map({LOCALISATION_OUTPUT: _bleed_map()[None]}, _geometry(sources), True, 0.8)
    assert kept is not None and kept.threshold == 0.8 and (kept.first, kept.last) == (5, 7)
    back = from_bytes(to_bytes(kept))
    np.testing.assert_array_equal(back.cells, kept.cells)
    assert back.geometry == kept.geometry and back.level == kept.level
    assert len(to_bytes(kept)) < 16_000
    for bad in (b"", b"{}", b"\xff", b'{"format": "radtriage.localisation-map/1", "shape": [2, 2, 2]}'):
        with pytest.raises(MapError):
            from_bytes(bad)
    # Nothing to keep: negative, no map, no in-plane field.
    assert stored_map({LOCALISATION_OUTPUT: _bleed_map()}, _geometry(sources), False) is None
    assert stored_map({}, _geometry(sources), True) is None
    no_field = SeriesGeometry(CROP, _geometry(sources).positions_mm, _geometry(sources).instance_numbers)
    assert stored_map({LOCALISATION_OUTPUT: _bleed_map()}, no_field, True) is None


def test_the_blob_store_keeps_a_map_under_its_study(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    key = map_key(f"{STUDY}/ich/20261207T080000.000000Z")
    uri = blobs.put_localisation_map(STUDY, key, b"{}")
    assert blobs.read(uri) == b"{}"
    assert blobs.path_of(uri).parent.parent == tmp_path.resolve() / STUDY
    assert blobs.put_localisation_map(STUDY, key, b"[]") == uri  # a replay rewrites it
    with pytest.raises(BlobStoreError):
        blobs.put_localisation_map(STUDY, "../../etc", b"{}")
    with pytest.raises(BlobStoreError):
        blobs.put_localisation_map("../x", key, b"{}")


@pytest.mark.parametrize("kind", ["ich", "nodules"])
def test_dciodvfy_finds_no_error(sources: list[Dataset], tmp_path: Path, kind: str) -> None:
    if kind == "ich":
        finding, kept = _ich(sources, _bleed_map())
        seg = build_seg(finding, sources, kept)
    else:
        nodule = LungNodule(centre_lps_mm=(0.5, -3.5, 2.5), diameter_mm=12.0, probability=0.8, lung="left")
        seg = build_seg(
            _nodule_finding((nodule, nodule.model_copy(update={"centre_lps_mm": (9.5, 9.5, 30.0)}))), sources
        )
    path = tmp_path / "seg.dcm"
    path.write_bytes(encode(seg))
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == [], "\n".join(lines)


def _centroid_rc(mask: np.ndarray) -> np.ndarray:
    """(row, column) centre of a (z, y, x) mask, in pixel-centre coordinates."""
    _, rows, cols = np.nonzero(mask)
    return np.array([rows.mean(), cols.mean()])


def _series_rc(model_rc: np.ndarray, field: PlaneField, size: int) -> np.ndarray:
    """Model pixel-centre coordinates → the series' (the field's edges map onto the input's)."""
    rows = field.row_start + (model_rc[0] + 0.5) * (field.row_stop - field.row_start) / size - 0.5
    cols = field.col_start + (model_rc[1] + 0.5) * (field.col_stop - field.col_start) / size - 0.5
    return np.array([rows, cols])


@pytest.mark.parametrize("pooled", [False, True])
def test_the_field_maps_the_model_input_back_onto_the_series_pixels(tmp_path: Path, pooled: bool) -> None:
    """The blood of a phantom, through the served preprocessing, lands back where it is."""
    from models.phantoms import head_ct_phantom
    from processors.model_inputs import prepare_input
    from processors.preprocessing import ICH_INPUT_SHAPE, preprocess_head_ct_with_mask

    ph = head_ct_phantom(np.random.default_rng(31), bleed=True, min_bleed_ml=5.0)
    assert ph.blood_mask is not None
    # Air on the left and above, unevenly: the head's box is off-centre and not square.
    hu = np.pad(ph.hu, ((0, 0), (30, 0), (0, 12)), constant_values=-1000)
    blood = np.pad(ph.blood_mask, ((0, 0), (30, 0), (0, 12)))
    spacing = ph.spacing_zyx
    if pooled:  # 3x finer in-plane: the loader pools it back 2x (processors.preprocessing.ich_pooling)
        hu, blood = np.repeat(np.repeat(hu, 3, 1), 3, 2), np.repeat(np.repeat(blood, 3, 1), 3, 2)
        spacing = (spacing[0], spacing[1] / 3, spacing[2] / 3)
    files = write_ct_series(hu.astype(np.float32), spacing, tmp_path)
    _, volume, geometry = prepare_input("ich_classifier", files)
    assert isinstance(geometry, SeriesGeometry) and geometry.field is not None
    assert (volume.pool_zyx[1] > 1) == pooled
    # The blood's own mask through the same crop, pad and resize, at the volume's resolution.
    k = volume.pool_zyx[1]
    pooled_blood = blood[:, : volume.hu.shape[1] * k : k, : volume.hu.shape[2] * k : k]
    _, model_blood = preprocess_head_ct_with_mask(volume.hu, volume.spacing_zyx, pooled_blood)
    back = _series_rc(_centroid_rc(model_blood > 0.5), geometry.field, ICH_INPUT_SHAPE[2])
    assert back == pytest.approx(_centroid_rc(blood), abs=2.0 * k)
    # Square in mm: the field's rows and columns span the same millimetres.
    rows_mm = (geometry.field.row_stop - geometry.field.row_start) * spacing[1]
    cols_mm = (geometry.field.col_stop - geometry.field.col_start) * spacing[2]
    assert rows_mm == pytest.approx(cols_mm, abs=2 * k * spacing[1])
