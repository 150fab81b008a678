"""The realistic head CT study generator (models/realistic_study.py): the headers a scanner
writes, geometry consistent with each reconstruction, every file readable, and the
dicom3tools / dcmtk validators finding no errors. Small slice counts, real 512 x 512."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import FileDataset
from pydicom.uid import JPEGLSLossless

from models.realistic_study import (
    XRAY_RADIATION_DOSE_SR,
    SeriesKind,
    StudyManifest,
    TransferSyntax,
    write_realistic_head_study,
)
from radtriage.settings import REPO_ROOT
from schemas.routing_rules import RoutingRules
from schemas.studies import SeriesRef
from streams.routing import series_matches
from tests.support.dicom import dcmtk_tool

AXIAL, THIN, BONE = 6, 16, 8
SEED = 16


def _study(where: Path, seed: int, **kw: Any) -> StudyManifest:
    """A realistic head study of few slices per series (a unit test's size); `kw` as
    write_realistic_head_study takes them."""
    return write_realistic_head_study(
        where, rng=np.random.default_rng(seed), axial_slices=AXIAL, thin_slices=THIN, bone_slices=BONE, **kw
    )


@pytest.fixture(scope="module")
def signed_bleed(tmp_path_factory: pytest.TempPathFactory) -> StudyManifest:
    """Siemens-style: signed pixels, -2000 padding, InstanceNumber rising along z."""
    return _study(tmp_path_factory.mktemp("signed"), SEED, bleed=True, accession="ACC16", patient_id="MRN16")


@pytest.fixture(scope="module")
def unsigned_normal(tmp_path_factory: pytest.TempPathFactory) -> StudyManifest:
    """GE-style names, unsigned pixels (intercept -1024), InstanceNumber falling along z."""
    return _study(
        tmp_path_factory.mktemp("unsigned"),
        SEED + 1,
        bleed=False,
        signed=False,
        instance_order="descending",
        vendor="ge",
        accession="ACC17",
        patient_id="MRN17",
    )


def headers(path: Path) -> FileDataset:
    return dcmread(path, stop_before_pixels=True)


@pytest.mark.parametrize("which", ["signed_bleed", "unsigned_normal"])
def test_one_study_one_patient_and_the_series_a_scanner_sends(
    which: str, request: pytest.FixtureRequest
) -> None:
    m: StudyManifest = request.getfixturevalue(which)
    assert [s.kind for s in m.series] == ["scout", "axial", "thin", "bone", "dose_sr"]
    assert [len(s.files) for s in m.series] == [2, AXIAL, THIN, BONE, 1]
    assert len({s.series_uid for s in m.series}) == 5
    assert len({s.series_number for s in m.series}) == 5
    for s in m.series:
        for f in s.files:
            ds = headers(f)
            assert (ds.StudyInstanceUID, ds.PatientID, ds.AccessionNumber) == (
                m.study_uid,
                m.patient_id,
                m.accession,
            )
            assert ds.StudyDescription == "CT HEAD WO CONTRAST"
            assert (ds.SeriesInstanceUID, int(ds.SeriesNumber), ds.SeriesDescription) == (
                s.series_uid,
                s.series_number,
                s.description,
            )
            assert ds.Modality == s.modality
            if s.kind != "dose_sr":
                assert ds.BodyPartExamined == "HEAD"
    # Every reconstruction of the spiral and the scout share one frame of reference.
    frames = {headers(f).FrameOfReferenceUID for s in m.series if s.kind != "dose_sr" for f in s.files}
    assert len(frames) == 1


def test_image_type_kernel_and_thickness_per_series(
    signed_bleed: StudyManifest, unsigned_normal: StudyManifest
) -> None:
    expected: dict[str, dict[SeriesKind, tuple[str, str, float]]] = {
        # kind: (ImageType value 3, kernel, SliceThickness)
        "siemens": {"scout": ("LOCALIZER", "T20f", 0.6), "axial": ("AXIAL", "H30s", 5.0),
                    "thin": ("AXIAL", "H30s", 0.625), "bone": ("AXIAL", "H70h", 1.25)},
        "ge": {"scout": ("LOCALIZER", "STANDARD", 0.6), "axial": ("AXIAL", "STANDARD", 5.0),
               "thin": ("AXIAL", "STANDARD", 0.625), "bone": ("AXIAL", "BONE", 1.25)},
    }  # fmt: skip
    for m, vendor in ((signed_bleed, "siemens"), (unsigned_normal, "ge")):
        for kind, (third, kernel, thickness) in expected[vendor].items():
            for f in m.of(kind).files:
                ds = headers(f)
                assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", third], (vendor, kind)
                assert ds.ConvolutionKernel == kernel, (vendor, kind)
                assert float(ds.SliceThickness) == pytest.approx(thickness), (vendor, kind)
                assert (ds.Rows, ds.Columns) == (512, 512)


def test_the_ich_rule_takes_the_5mm_series_and_never_the_scout_or_the_sr(
    signed_bleed: StudyManifest, unsigned_normal: StudyManifest
) -> None:
    """The study's headers are the ones routing reads (deploy/routing/rules.yaml): the ICH
    rule must match the 5 mm soft-tissue series of either vendor's naming, and never the
    scout or the dose SR. Which of the other reconstructions it may also match is the
    rule's business (series selection), not the generator's."""
    rules = RoutingRules.load(REPO_ROOT / "deploy" / "routing" / "rules.yaml")
    (ich,) = [r for r in rules.rules if r.id == "ct-head-noncontrast-ich"]
    for m in (signed_bleed, unsigned_normal):
        matched = set()
        for s in m.series:
            ref = SeriesRef(
                series_uid=s.series_uid,
                modality=s.modality,
                body_part="HEAD" if s.modality == "CT" else "",
                series_description=s.description,
                # A full-size series' instance count (the fixtures' are cut down for speed).
                instance_uris=tuple(
                    f"file://{m.root}/{s.kind}/{i}" for i in range(32 if s.kind != "dose_sr" else 1)
                ),
                series_number=s.series_number,
                has_pixels=s.kind != "dose_sr",
                image_type=s.image_type,
                convolution_kernel=s.convolution_kernel,
                slice_thickness_mm=s.slice_thickness_mm,
                rows=512 if s.kind != "dose_sr" else 0,
                columns=512 if s.kind != "dose_sr" else 0,
                bits_allocated=16 if s.kind != "dose_sr" else 0,
            )
            if series_matches(ich, ref):
                matched.add(s.kind)
        assert "axial" in matched and not matched & {"scout", "dose_sr"}, (m.of("axial").description, matched)


@pytest.mark.parametrize("which", ["signed_bleed", "unsigned_normal"])
@pytest.mark.parametrize("kind", ["axial", "thin", "bone"])
def test_axial_positions_follow_the_thickness_and_instance_numbers_their_direction(
    which: str, kind: SeriesKind, request: pytest.FixtureRequest
) -> None:
    m: StudyManifest = request.getfixturevalue(which)
    s = m.of(kind)
    assert s.slice_thickness_mm is not None
    slices = [headers(f) for f in s.files]
    numbers = [int(ds.InstanceNumber) for ds in slices]
    assert numbers == list(range(1, len(slices) + 1))  # manifest lists files in InstanceNumber order
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
    steps = np.diff(z)
    sign = 1.0 if m.instance_order == "ascending" else -1.0
    np.testing.assert_allclose(steps, sign * s.slice_thickness_mm, atol=1e-3)
    for ds, zi in zip(slices, z, strict=True):
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.SliceLocation) == pytest.approx(zi, abs=1e-3)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(s.slice_thickness_mm)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([240 / 512] * 2)
        assert float(ds.ImagePositionPatient[0]) == pytest.approx(-(511) * 240 / 512 / 2, abs=1e-3)
    assert s.z_range_mm == pytest.approx((z.min(), z.max()), abs=1e-3)


def test_a_bleed_study_shows_its_bleed_on_every_reconstruction(signed_bleed: StudyManifest) -> None:
    m = signed_bleed
    assert m.has_bleed and m.bleed_volume_ml >= 5.0 and m.bleed_z_mm is not None
    lo, hi = m.bleed_z_mm
    centre = (lo + hi) / 2
    for kind in ("axial", "thin", "bone"):
        z_range = m.of(kind).z_range_mm
        assert z_range is not None
        assert z_range[0] <= centre <= z_range[1], (kind, z_range, m.bleed_z_mm)


def _hu(path: Path) -> np.ndarray:
    ds = dcmread(path)
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_reconstructions_of_one_spiral_agree_where_they_overlap(signed_bleed: StudyManifest) -> None:
    """The 5 mm slice equals the mean of the thin slices inside its slab, give or take noise
    and interpolation: one anatomy at one place on every grid."""
    m = signed_bleed
    thin = [(float(headers(f).ImagePositionPatient[2]), f) for f in m.of("thin").files]
    tz = [z for z, _ in thin]
    best = None
    for f in m.of("axial").files:
        z = float(headers(f).ImagePositionPatient[2])
        inside = [p for zt, p in thin if abs(zt - z) < 2.5]
        if min(tz) <= z - 2.0 and z + 2.0 <= max(tz) and (best is None or len(inside) > len(best[1])):
            best = (f, inside)
    assert best is not None and len(best[1]) >= 7, "no 5 mm slice lies inside the thin series"
    thick = _hu(best[0])
    thin_mean = np.mean([_hu(p) for p in best[1]], axis=0)
    head = (thick > -500) & (thick < 2000)  # inside the head; padding and air excluded
    assert head.sum() > 20000
    # Mean absolute difference over the head: the skull's edges move quickly with z, so a
    # slab taken at the wrong height shows up there.
    same = float(np.abs(thick - thin_mean)[head].mean())
    assert same < 6.0, same
    # And not trivially: the 5 mm slice 10 mm away differs far more (the check can fail).
    z_best = float(headers(best[0]).ImagePositionPatient[2])
    far = [f for f in m.of("axial").files if abs(float(headers(f).ImagePositionPatient[2]) - z_best) >= 9.9]
    assert far
    other = float(np.abs(_hu(far[0]) - thin_mean)[head].mean())
    assert other > 5 * same, (same, other)


def test_pixel_representation_rescale_and_fov_padding(
    signed_bleed: StudyManifest, unsigned_normal: StudyManifest
) -> None:
    for m, signed, intercept, bits, pad in (
        (signed_bleed, True, 0.0, 16, -2000),
        (unsigned_normal, False, -1024.0, 12, 0),
    ):
        for kind in ("axial", "thin", "bone"):
            ds = dcmread(m.of(kind).files[0])
            assert ds.PixelRepresentation == int(signed)
            assert float(ds.RescaleIntercept) == intercept and float(ds.RescaleSlope) == 1.0
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, bits, bits - 1)
            assert ds.RescaleType == "HU"
            assert ds.PixelPaddingValue == pad
            px = ds.pixel_array
            assert px.dtype == (np.int16 if signed else np.uint16)
            # Outside the reconstruction circle: the padding value; the centre: the head.
            for corner in (px[0, 0], px[0, -1], px[-1, 0], px[-1, -1]):
                assert corner == pad
            hu = px.astype(np.float32) + intercept
            assert hu[256, 256] > -200, (kind, hu[256, 256])
            inside = hu[200:312, 200:312]
            assert -1024 <= inside.min() and inside.max() <= 3071


def test_without_padding_the_corners_are_air_and_an_unstorable_padding_is_refused(tmp_path: Path) -> None:
    m = write_realistic_head_study(
        tmp_path / "nopad", bleed=False, rng=np.random.default_rng(3), include=("axial",), axial_slices=1,
        pad_fov=False,
    )  # fmt: skip
    ds = dcmread(m.of("axial").files[0])
    assert "PixelPaddingValue" not in ds
    assert float(ds.pixel_array[0, 0]) + float(ds.RescaleIntercept) < -900
    with pytest.raises(ValueError, match="cannot be stored"):
        write_realistic_head_study(tmp_path / "bad", bleed=False, signed=False, padding_value=-2000)
    with pytest.raises(ValueError, match="include"):
        write_realistic_head_study(tmp_path / "bad", bleed=False, include=("mip",))  # type: ignore[arg-type]


def test_the_scout_is_two_orthogonal_localizer_projections(signed_bleed: StudyManifest) -> None:
    ap, lat = (dcmread(f) for f in signed_bleed.of("scout").files)
    assert [float(v) for v in ap.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    assert [float(v) for v in lat.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]
    for ds in (ap, lat):
        px = ds.pixel_array.astype(np.float32)
        # The head is in the middle; the canvas edge is air (no path through anything).
        assert px[256, 256] > px[0, 0] + 500
        assert "PixelPaddingValue" not in ds


def test_the_dose_sr_is_an_xray_radiation_dose_report_without_pixels(signed_bleed: StudyManifest) -> None:
    (path,) = signed_bleed.of("dose_sr").files
    ds = dcmread(path)
    assert ds.SOPClassUID == XRAY_RADIATION_DOSE_SR == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "SR" and "PixelData" not in ds
    assert ds.ConceptNameCodeSequence[0].CodeValue == "113701"
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "10011"

    def nums(items: list, out: dict[str, list[float]]) -> dict[str, list[float]]:  # type: ignore[type-arg]
        for it in items:
            if it.ValueType == "NUM":
                name = it.ConceptNameCodeSequence[0].CodeMeaning
                out.setdefault(name, []).append(float(it.MeasuredValueSequence[0].NumericValue))
            if "ContentSequence" in it:
                nums(list(it.ContentSequence), out)
        return out

    values = nums(list(ds.ContentSequence), {})
    assert values["Mean CTDIvol"] and max(values["Mean CTDIvol"]) > 10
    assert values["CT Dose Length Product Total"] == [pytest.approx(sum(values["DLP"]))]
    # The SR names the spiral the images came from: its irradiation event is theirs.
    uids = [it.UID for it in _walk(list(ds.ContentSequence)) if it.ValueType == "UIDREF"]
    assert headers(signed_bleed.of("axial").files[0]).IrradiationEventUID in uids
    assert signed_bleed.study_uid in uids


def _walk(items: list) -> list:  # type: ignore[type-arg]
    out = []
    for it in items:
        out.append(it)
        if "ContentSequence" in it:
            out += _walk(list(it.ContentSequence))
    return out


@pytest.mark.parametrize("which", ["signed_bleed", "unsigned_normal"])
def test_pydicom_reads_every_file(which: str, request: pytest.FixtureRequest) -> None:
    m: StudyManifest = request.getfixturevalue(which)
    for s in m.series:
        for f in s.files:
            ds = dcmread(f)
            if s.kind == "dose_sr":
                assert "PixelData" not in ds
            else:
                assert ds.pixel_array.shape == (512, 512)


def test_a_subset_of_series_and_a_compressed_copy(tmp_path: Path) -> None:
    def write(out: Path, syntax: TransferSyntax) -> StudyManifest:
        return write_realistic_head_study(
            out,
            bleed=True,
            rng=np.random.default_rng(5),
            include=("axial", "bone"),
            axial_slices=3,
            bone_slices=2,
            transfer_syntax=syntax,
        )

    plain, packed = write(tmp_path / "plain", "explicit"), write(tmp_path / "jls", "jpeg-ls")
    assert [s.kind for s in packed.series] == ["axial", "bone"]
    for a, b in zip(plain.files(), packed.files(), strict=True):
        da, db = dcmread(a), dcmread(b)
        assert db.file_meta.TransferSyntaxUID == JPEGLSLossless
        # Lossless: the same seed gives the same pixels, compressed or not.
        np.testing.assert_array_equal(da.pixel_array, db.pixel_array)
        assert db.SliceThickness == da.SliceThickness and db.ConvolutionKernel == da.ConvolutionKernel


def _one_file_per_series(m: StudyManifest) -> list[Path]:
    return [s.files[0] for s in m.series]


def test_dciodvfy_finds_no_errors_in_any_series_or_the_sr(
    signed_bleed: StudyManifest, unsigned_normal: StudyManifest
) -> None:
    """dicom3tools' IOD validator on one image of each series and the dose SR. Not skipped
    when missing: `apt-get install dicom3tools` (scripts/install.sh --test must install it)."""
    tool = shutil.which("dciodvfy")
    assert tool, "dciodvfy (Debian package dicom3tools) is required: apt-get install -y dicom3tools"
    problems = {}
    for f in _one_file_per_series(signed_bleed) + _one_file_per_series(unsigned_normal):
        out = subprocess.run([tool, str(f)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        if errors:
            problems[f"{f.parent.name}/{f.name}"] = errors
    assert not problems, problems


def test_dsrdump_reads_the_dose_sr_tree_without_complaint(signed_bleed: StudyManifest) -> None:
    """dcmtk's SR reader checks the content tree against the IOD's relationship constraints
    (dciodvfy checks the modules, not the tree)."""
    (path,) = signed_bleed.of("dose_sr").files
    out = subprocess.run([dcmtk_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    complaints = [line for line in out.stderr.splitlines() if re.match(r"^[WE]: ", line)]
    assert not complaints, complaints
    assert "X-Ray Radiation Dose SR" in out.stdout and "Mean CTDIvol" in out.stdout
