"""MG objects written by models/mammo_birads/writer.py and read back by processors/mammogram.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation, generate_uid

from connectors.dicom import validation
from models.mammo_birads.phantoms import VIEWS, MammoStudy, mammo_study_phantom, mammo_view_phantom
from models.mammo_birads.writer import write_mammogram_study, write_mammogram_view
from processors.dicom_volume import VolumeError
from processors.mammogram import load_mammogram

VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
ORIENTATION = {"RCC": ["P", "L"], "LCC": ["A", "R"], "RMLO": ["P", "FL"], "LMLO": ["A", "FR"]}


@pytest.fixture(scope="module")
def study() -> MammoStudy:
    return mammo_study_phantom(np.random.default_rng(71), category=4, side="right")


def test_mg_objects_carry_the_mammography_attributes(tmp_path: Path, study: MammoStudy) -> None:
    paths = write_mammogram_study(study, tmp_path, accession="ACC1", patient_id="P1")
    assert [p.name for p in paths] == ["MG0001.dcm", "MG0002.dcm", "MG0003.dcm", "MG0004.dcm"]
    datasets = [dcmread(p) for p in paths]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 4
    for k, (ds, view, key) in enumerate(zip(datasets, study.views, VIEWS, strict=True), start=1):
        assert ds.SOPClassUID == DigitalMammographyXRayImageStorageForPresentation
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2"
        assert ds.SOPClassUID in validation.TRIAGED_SOP_CLASSES
        assert ds.Modality == "MG" and ds.BodyPartExamined == "BREAST" and ds.InstanceNumber == k
        assert ds.ImageLaterality == key[0] == view.laterality and "Laterality" not in ds
        assert ds.ViewPosition == key[1:] == view.view
        code = ds.ViewCodeSequence[0]
        assert (code.CodeValue, code.CodeMeaning) == VIEW_CODES[view.view]
        assert code.CodingSchemeDesignator == "SCT"
        region = ds.AnatomicRegionSequence[0]
        assert (region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning) == (
            "76752008",
            "SCT",
            "Breast",
        )
        assert list(ds.PatientOrientation) == ORIENTATION[key]
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.PixelIntensityRelationship == "LOG" and ds.PresentationLUTShape == "IDENTITY"
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert [float(v) for v in ds.ImagerPixelSpacing] == pytest.approx(list(view.pixel_mm))
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx(list(view.pixel_mm))
        assert ds.BreastImplantPresent == "NO" and ds.PositionerType == "MAMMOGRAPHIC"
        assert ds.OrganExposed == "BREAST" and 25 <= float(ds.KVP) <= 35
        assert float(ds.BodyPartThickness) > 0 and float(ds.CompressionForce) > 0
        assert ds.Manufacturer == "radtriage" and ds.AccessionNumber == "ACC1" and ds.PatientID == "P1"
        assert (ds.Rows, ds.Columns) == view.pixels.shape
        # Stored the way real systems store it: a right breast mirrored (nipple to the left).
        stored = ds.pixel_array
        expected = view.pixels[:, ::-1] if view.laterality == "R" else view.pixels
        np.testing.assert_array_equal(stored, expected)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_round_trip_gives_back_the_phantom_in_the_normalised_orientation(
    tmp_path: Path, study: MammoStudy, photometric: str
) -> None:
    paths = write_mammogram_study(study, tmp_path, photometric=photometric)
    ds = dcmread(paths[0])
    assert ds.PhotometricInterpretation == photometric
    assert ds.PresentationLUTShape == ("IDENTITY" if photometric == "MONOCHROME2" else "INVERSE")
    mammogram = load_mammogram(paths[::-1])  # file order is not view order
    assert list(mammogram.views) == list(VIEWS) and mammogram.n_instances == 4
    assert mammogram.series_uid == ds.SeriesInstanceUID and mammogram.study_uid == ds.StudyInstanceUID
    for key, view in zip(VIEWS, study.views, strict=True):
        image = mammogram.views[key]
        assert (image.laterality, image.view) == (view.laterality, view.view)
        assert image.pixels.dtype == np.float32
        np.testing.assert_array_equal(image.pixels, view.pixels.astype(np.float32))
        assert image.pixel_mm == pytest.approx(view.pixel_mm)
        assert image.instance_number == VIEWS.index(key) + 1 and image.sop_instance_uid
    # Chest wall at column 0 for the right breast too: the breast is on the left of the array.
    rcc = mammogram.views["RCC"].pixels
    assert np.median(rcc[:, :10]) > 5 * np.median(rcc[:, -10:])


def _write_one(tmp_path: Path, series_uid: str, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(kwargs.pop("seed", 0))
    view = mammo_view_phantom(
        rng,
        category=1,
        laterality=kwargs.pop("laterality", "L"),
        view=kwargs.pop("view", "CC"),
        shape=(80, 96),
    )
    return write_mammogram_view(view, tmp_path, series_uid=series_uid, **kwargs)


def test_normalisation_follows_patient_orientation_and_the_modality_lut(tmp_path: Path) -> None:
    uid = generate_uid()
    path = _write_one(tmp_path, uid, laterality="R", instance_number=1)
    ds = dcmread(path)
    phantom = ds.pixel_array[:, ::-1].astype(np.float32)
    # A sender that stores a right breast unmirrored says so with a row direction of "A".
    ds.PatientOrientation = ["A", "L"]
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-10"
    ds.save_as(path)
    image = load_mammogram([path]).views["RCC"]
    np.testing.assert_array_equal(image.pixels, phantom * 2 - 10)
    # PixelSpacing absent: ImagerPixelSpacing gives the spacing.
    del ds.PixelSpacing
    ds.save_as(path)
    assert load_mammogram([path]).views["RCC"].pixel_mm == pytest.approx(
        tuple(float(v) for v in ds.ImagerPixelSpacing)
    )


def test_a_repeat_exposure_replaces_the_first_and_other_views_are_skipped(tmp_path: Path) -> None:
    uid = generate_uid()
    first = _write_one(tmp_path / "a", uid, seed=1, view="MLO", instance_number=2)
    repeat = _write_one(tmp_path / "b", uid, seed=2, view="MLO", instance_number=5)
    extra = _write_one(tmp_path / "c", uid, seed=3, view="CC", instance_number=3)
    ds = dcmread(extra)
    ds.ViewPosition = "XCCL"  # an exaggerated CC of the work-up: not a screening view
    ds.save_as(extra)
    mammogram = load_mammogram([repeat, extra, first])
    assert list(mammogram.views) == ["LMLO"] and mammogram.n_instances == 3
    image = mammogram.views["LMLO"]
    assert image.instance_number == 5
    np.testing.assert_array_equal(image.pixels, dcmread(repeat).pixel_array.astype(np.float32))


def test_laterality_falls_back_to_the_series_attribute(tmp_path: Path) -> None:
    path = _write_one(tmp_path, generate_uid(), laterality="L", view="MLO", instance_number=1)
    ds = dcmread(path)
    del ds.ImageLaterality
    ds.Laterality = "R"
    ds.save_as(path)
    assert list(load_mammogram([path]).views) == ["RMLO"]


def test_malformed_input_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    uid = generate_uid()
    good = _write_one(tmp_path / "good", uid, instance_number=1)

    with pytest.raises(VolumeError, match="no instances"):
        load_mammogram([])

    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not a DICOM file at all")
    with pytest.raises(VolumeError, match=r"junk\.dcm: not a readable DICOM"):
        load_mammogram([junk])

    data = good.read_bytes()
    for name, cut in (("half.dcm", len(data) // 2), ("header.dcm", 300)):
        truncated = tmp_path / name
        truncated.write_bytes(data[:cut])
        with pytest.raises(VolumeError, match=name.replace(".", r"\.")):
            load_mammogram([truncated])

    other = _write_one(tmp_path / "other", generate_uid(), laterality="R", instance_number=2)
    with pytest.raises(VolumeError, match="2 series"):
        load_mammogram([good, other])

    # A copy of the good view with one thing wrong (attributes set, or removed: None), and
    # what the loader says of it.
    broken: list[tuple[str, dict[str, str | None], str]] = [
        ("no_side.dcm", {"ImageLaterality": None}, r"no_side\.dcm: no ImageLaterality or Laterality"),
        ("spot.dcm", {"ViewPosition": "ML"}, "no CC or MLO view"),
        ("rgb.dcm", {"PhotometricInterpretation": "RGB"}, r"rgb\.dcm: PhotometricInterpretation RGB"),
        (
            "no_geometry.dcm",
            {"PixelSpacing": None, "ImagerPixelSpacing": None},
            r"no_geometry\.dcm: .*missing geometry",
        ),
        ("no_pixels.dcm", {"PixelData": None}, r"no_pixels\.dcm: no pixel data"),
    ]
    for name, changes, message in broken:
        ds = dcmread(good)
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(tmp_path / name)
        with pytest.raises(VolumeError, match=message):
            load_mammogram([tmp_path / name])


def test_the_writer_refuses_bad_input(tmp_path: Path, study: MammoStudy) -> None:
    view = study.views[0]
    with pytest.raises(ValueError, match="photometric"):
        write_mammogram_view(view, tmp_path, instance_number=1, photometric="RGB")
    with pytest.raises(ValueError, match="instance_number"):
        write_mammogram_view(view, tmp_path, instance_number=0)
    from dataclasses import replace

    with pytest.raises(ValueError, match="12-bit"):
        write_mammogram_view(replace(view, pixels=view.pixels + 4096), tmp_path, instance_number=1)
    with pytest.raises(ValueError, match="laterality"):
        write_mammogram_view(replace(view, laterality="B"), tmp_path, instance_number=1)
    with pytest.raises(ValueError, match="views"):
        write_mammogram_study(MammoStudy(views=study.views[::-1], category=4, side="right"), tmp_path)
