"""A scanner-sized head CT loads and preprocesses for the ICH model in bounded memory (issue 16).

Measured, in a fresh child process (bench/preprocess.py `--child`): its peak RSS (VmHWM) and
its RSS once torch, MONAI and pydicom are imported (the baseline every preprocessing process
pays, ~0.8 GB with the CUDA build of torch, ~0.43 GB of it shared library pages). For the
240 x 512 x 512 int16 series (126 MB of pixels) the loader pooled onto the ICH working grid
(4, 3, 3 -> 60 x 170 x 170) measured on the 2-core development box (bench/RESULTS.md): peak
0.91 GB total, 85 MB above the baseline; before issue 16 the same series took 17.9 GB (and
51 s).
A memory figure, not a timing: it does not depend on how busy the machine is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.preprocess import run_child, thin_head_series

GIB = 1 << 30


@pytest.mark.timeout(180)
def test_a_240_slice_512_matrix_head_ct_preprocesses_in_under_1_gb(tmp_path: Path) -> None:
    files, _ = thin_head_series(tmp_path / "series", 240, 512)
    assert len(files) == 240
    pixel_bytes = 240 * 512 * 512 * 2  # int16 as stored
    result = run_child("ich_classifier", tmp_path / "series")
    assert result["pool_zyx"] == [4, 3, 3] and result["working_grid"] == [60, 170, 170]
    assert result["tensor_shape"] == [3, 32, 96, 96]
    working = result["peak_rss_bytes"] - result["baseline_rss_bytes"]
    # Everything the series needed beyond the imports stays below one float32 copy of it (a
    # full-resolution float volume alone would be 2x the int16 pixels) ...
    assert working < 2 * pixel_bytes, f"{working / 1e6:.0f} MB above the baseline"
    # ... and the whole process below the bound.
    assert result["peak_rss_bytes"] < GIB, f"peak RSS {result['peak_rss_bytes'] / 1e6:.0f} MB"
