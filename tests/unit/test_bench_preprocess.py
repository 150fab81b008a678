"""bench/preprocess.py's scanner-sized CT: the phantom's extent kept as it is upsampled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import models.dicom_writer
from bench import preprocess


def test_scanner_sized_ct_upsamples_to_400_x_512_and_scales_the_spacing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    def upsampled(hu: np.ndarray, slices: int, matrix: int) -> np.ndarray:
        seen["upsampled"] = (hu.shape, slices, matrix)
        return np.zeros((1, 1, 1), np.int16)  # the real one: 400 x 512 x 512, too big for a unit test

    def write(volume: np.ndarray, spacing: tuple[float, ...], out: Path) -> list[Path]:
        seen["spacing"], seen["out"] = spacing, out
        return [out / "1.dcm"]

    monkeypatch.setattr(preprocess, "_upsampled", upsampled)
    monkeypatch.setattr(models.dicom_writer, "write_ct_series", write)
    files = preprocess._scanner_sized_ct(np.zeros((100, 128, 128), np.int16), (2.0, 1.0, 0.5), tmp_path)
    assert files == [tmp_path / "1.dcm"]
    assert seen["upsampled"] == ((100, 128, 128), 400, 512)
    # 100 slices of 2 mm over 400 slices; 128 pixels of 1 and 0.5 mm over 512.
    assert seen["spacing"] == (0.5, 0.25, 0.125)
    assert seen["out"] == tmp_path


def test_with_working_set_is_peak_over_baseline_also_per_pixel_byte(
    capsys: pytest.CaptureFixture[str],
) -> None:
    row = {"series": "x", "pixel_bytes": 1000, "peak_rss_bytes": 5000, "baseline_rss_bytes": 2000}
    assert preprocess.with_working_set(row) is row
    assert row["working_rss_bytes"] == 3000
    assert row["working_bytes_per_pixel_byte"] == 3.0
    assert json.loads(capsys.readouterr().err) == row  # progress, one JSON line per case
