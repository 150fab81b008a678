"""Enhanced (multi-frame) CT loads as a volume, frame by frame (issue 16).

An Enhanced CT Image Storage object is one instance holding every slice as a frame, with
its geometry in functional groups: per frame the position (PlanePositionSequence), shared
(or per frame) the orientation, pixel spacing and rescale. Built here from a classic series
with pydicom alone, frames deliberately out of position order, and loaded against that
series.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from processors.dicom_volume import Volume, VolumeError, load_series


@pytest.fixture(scope="module")
def classic(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Volume]:
    ph = head_ct_phantom(np.random.default_rng(51), bleed=True)
    files = write_ct_series(ph.hu[8:20], ph.spacing_zyx, tmp_path_factory.mktemp("classic"))
    return files, load_series(files)


def _item(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def enhanced_from_classic(
    files: list[Path], out: Path, *, per_frame_rescale: bool = False, seed: int = 0
) -> Path:
    """One Enhanced CT instance with the classic series' slices as frames, in a shuffled order.
    `per_frame_rescale`: rescale in each frame's functional groups (here: frame k's stored
    values shifted by k and its intercept by -k, the same HU) instead of the shared ones."""
    slices = [dcmread(f) for f in files]
    order = np.random.default_rng(seed).permutation(len(slices))
    first = slices[0]
    ds = Dataset()
    for keyword in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "PatientID",
        "PatientName",
    ):
        setattr(ds, keyword, first.get(keyword))
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = first.Rows, first.Columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = first.PixelRepresentation
    ds.NumberOfFrames = len(slices)
    shared = _item(
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=first.ImageOrientationPatient)]),
        PixelMeasuresSequence=Sequence(
            [_item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)]
        ),
    )
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = Sequence(
            [
                _item(
                    RescaleSlope=first.RescaleSlope, RescaleIntercept=first.RescaleIntercept, RescaleType="HU"
                )
            ]
        )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, per_frame = [], []
    for k, i in enumerate(order):
        s = slices[int(i)]
        pixels = s.pixel_array
        group = _item(
            PlanePositionSequence=Sequence([_item(ImagePositionPatient=s.ImagePositionPatient)]),
            FrameContentSequence=Sequence([_item(InStackPositionNumber=int(i) + 1)]),
        )
        if per_frame_rescale:
            pixels = pixels + np.asarray(k, dtype=pixels.dtype)
            intercept = float(s.RescaleIntercept) - k
            group.PixelValueTransformationSequence = Sequence(
                [_item(RescaleSlope=s.RescaleSlope, RescaleIntercept=f"{intercept:g}", RescaleType="HU")]
            )
        frames.append(pixels)
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def _same_volume(enhanced: Volume, reference: Volume) -> None:
    np.testing.assert_array_equal(enhanced.hu, reference.hu)
    assert enhanced.spacing_zyx == pytest.approx(reference.spacing_zyx)
    assert enhanced.positions_mm == pytest.approx(reference.positions_mm)
    assert enhanced.affine is not None and reference.affine is not None
    np.testing.assert_allclose(enhanced.affine, reference.affine)
    assert enhanced.series_uid == reference.series_uid and enhanced.n_instances == 1
    # A frame is no instance: nothing to name it by but its position.
    assert enhanced.instance_numbers == (None,) * len(reference.positions_mm)


def test_enhanced_ct_loads_as_the_classic_series_it_was_built_from(
    classic: tuple[list[Path], Volume], tmp_path: Path
) -> None:
    files, reference = classic
    _same_volume(load_series([enhanced_from_classic(files, tmp_path / "e.dcm")]), reference)


def test_per_frame_rescale_is_applied_per_frame(classic: tuple[list[Path], Volume], tmp_path: Path) -> None:
    files, reference = classic
    path = enhanced_from_classic(files, tmp_path / "e.dcm", per_frame_rescale=True, seed=3)
    _same_volume(load_series([path]), reference)


def test_compressed_enhanced_ct_decodes_one_frame_at_a_time(
    classic: tuple[list[Path], Volume], tmp_path: Path
) -> None:
    """Encapsulated multi-frame: RLE (pydicom's own encoder) and, where GDCM is installed,
    JPEG 2000 lossless written by gdcmconv."""
    files, reference = classic
    plain = enhanced_from_classic(files, tmp_path / "plain.dcm", seed=5)
    rle = tmp_path / "rle.dcm"
    ds = dcmread(plain)
    ds.compress(RLELossless)
    ds.save_as(rle, enforce_file_format=True)
    _same_volume(load_series([rle]), reference)
    if shutil.which("gdcmconv"):
        j2k = tmp_path / "j2k.dcm"
        subprocess.run(["gdcmconv", "--j2k", str(plain), str(j2k)], check=True, capture_output=True)
        assert dcmread(j2k, stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
        _same_volume(load_series([j2k]), reference)


def test_enhanced_ct_on_a_working_grid(classic: tuple[list[Path], Volume], tmp_path: Path) -> None:
    files, _ = classic
    path = enhanced_from_classic(files, tmp_path / "e.dcm", seed=7)

    def pool(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[int, int, int]:
        return (3, 2, 2)

    enhanced, reference = load_series([path], pool=pool), load_series(files, pool=pool)
    np.testing.assert_array_equal(enhanced.hu, reference.hu)
    assert enhanced.series_positions_mm == pytest.approx(reference.series_positions_mm)


def test_multi_frame_without_per_frame_positions_is_refused(
    classic: tuple[list[Path], Volume], tmp_path: Path
) -> None:
    files, _ = classic
    ds = dcmread(enhanced_from_classic(files, tmp_path / "e.dcm"))
    del ds.PerFrameFunctionalGroupsSequence
    del ds.SharedFunctionalGroupsSequence
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        setattr(ds, keyword, dcmread(files[0]).get(keyword))
    ds.save_as(tmp_path / "flat.dcm")
    with pytest.raises(VolumeError, match="frames without per-frame positions"):
        load_series([tmp_path / "flat.dcm"])
    # An enhanced object whose frame lacks its position says which frame.
    ds = dcmread(enhanced_from_classic(files, tmp_path / "e2.dcm"))
    del ds.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence
    ds.save_as(tmp_path / "e2.dcm")
    with pytest.raises(VolumeError, match=r"e2\.dcm frame 5: no ImagePositionPatient"):
        load_series([tmp_path / "e2.dcm"])
