"""`radtriage up --pacs`'s local Orthanc (radtriage/stack/orthanc.py), real: it starts on its
ports with the DICOMweb plugin, takes an SR sent to the destination `up --pacs` configures
(C-STORE) and shows it in its REST API, and stops with nothing left listening."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.dicom_writer import write_ct_series
from processors.dicom_results import build_sr, read_headers
from radtriage.stack.orthanc import DESTINATION, LocalOrthanc, destination
from radtriage.stack.process import port_in_use
from streams.dicom_send import c_store
from tests.support.findings import ich_result
from tests.support.net import free_port

pytestmark = pytest.mark.integration


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_the_local_pacs_takes_the_results_and_shows_them(tmp_path: Path) -> None:
    pacs = LocalOrthanc(tmp_path / "pacs", free_port(), free_port())
    assert pacs.dicomweb, "orthanc-dicomweb is not installed (scripts/install.sh --test)"
    pacs.start()
    try:
        study = pydicom.uid.generate_uid()
        files = write_ct_series(np.full((3, 16, 16), 40.0), (5.0, 1.0, 1.0), tmp_path / "ct", study_uid=study)
        sources = read_headers(files)
        sr = build_sr(ich_result(study, str(sources[0].SeriesInstanceUID)), sources)
        target = destination(pacs.dicom_port)
        assert target.name == DESTINATION and set(target.objects) == {"sr", "seg", "key_image", "kos"}
        outcome = c_store(target, sr, 10.0)
        assert outcome.stored, outcome
        base = f"http://127.0.0.1:{pacs.http_port}"
        (found,) = _get(f"{base}/studies")  # type: ignore[misc]
        assert _get(f"{base}/studies/{found}")["MainDicomTags"]["StudyInstanceUID"] == study  # type: ignore[index]
        # The DICOMweb plugin answers QIDO-RS for the same study.
        (qido,) = _get(f"{base}/dicom-web/studies?StudyInstanceUID={study}")  # type: ignore[misc]
        assert qido["0020000D"]["Value"] == [study]
        with urllib.request.urlopen(pacs.web_ui, timeout=30) as response:
            assert response.status == 200
    finally:
        pacs.stop()
    assert not port_in_use(pacs.dicom_port) and not port_in_use(pacs.http_port)
