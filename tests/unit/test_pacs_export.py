"""The pacs-export stage's pure parts: destination settings and rules, the retry schedule,
and what a C-STORE answer means (streams/stages/pacs_export.py, streams/dicom_send.py)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset

from radtriage.settings import DicomDestination, DispatchSettings, Settings
from streams.dicom_send import outcome_of
from streams.pacs_send import backoff_delays


def test_destinations_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    destinations = [
        {
            "name": "pacs-main",
            "host": "pacs.example",
            "port": 11112,
            "ae_title": "MAINPACS",
            "findings": ["ICH"],
        },
        {"name": "research", "host": "10.0.0.9", "ae_title": "RESEARCH", "positive_only": True},
    ]
    monkeypatch.setenv("RADTRIAGE_DISPATCH__DESTINATIONS", json.dumps(destinations))
    main, research = Settings().dispatch.destinations
    assert (main.kind, main.objects, main.calling_ae_title, research.port) == (
        "dicom",
        ["sr"],
        "RADTRIAGE",
        104,
    )
    assert main.wants("ICH", positive=False) and not main.wants("LVO", positive=True)
    assert research.wants("LVO", positive=True) and not research.wants("LVO", positive=False)


def test_nothing_configured_sends_nothing() -> None:
    assert Settings().dispatch.destinations == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"findings": ["BLEED"]}, "unknown finding"),
        ({"objects": ["pdf"]}, "objects"),
        ({"ae_title": "A" * 17}, "AE title"),
        ({"kind": "stow"}, "kind"),
        ({"port": 0}, "port"),
        ({"objects": ["sr", "kos"]}, "kos without key_image"),
        ({"tls": {"ca_file": "/ca.pem", "cert_file": "/me.pem"}}, "together"),
        ({"tls": {}}, "ca_file"),
    ],
)
def test_a_bad_destination_is_refused_with_its_reason(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DicomDestination.model_validate({"name": "pacs", "host": "h", "ae_title": "PACS"} | fields)


def test_destination_names_are_unique() -> None:
    one = {"name": "pacs", "host": "h", "ae_title": "PACS"}
    with pytest.raises(ValidationError, match="duplicate"):
        DispatchSettings.model_validate({"destinations": [one, one]})


def test_a_seg_is_wanted_only_when_a_destination_asks_for_it() -> None:
    """The infer stage keeps localisation maps only then (streams/stages/infer_maps.py)."""
    sr_only = DicomDestination(name="a", host="h", ae_title="A", objects=["sr"])
    with_seg = DicomDestination(name="b", host="h", ae_title="B", objects=["sr", "seg"])
    assert not DispatchSettings().wants_object("seg")
    assert not DispatchSettings(destinations=[sr_only]).wants_object("seg")
    assert DispatchSettings(destinations=[sr_only, with_seg]).wants_object("seg")


def test_backoff_doubles_to_its_cap_and_stops_at_the_deadline() -> None:
    delays = backoff_delays(DispatchSettings(retry_initial_s=1, retry_max_s=8, retry_deadline_s=30))
    assert delays == [1, 2, 4, 8, 8, 7]
    assert sum(delays) == 30


def _status(code: int | None, comment: str = "") -> Dataset:
    ds = Dataset()
    if code is not None:
        ds.Status = code
    if comment:
        ds.ErrorComment = comment
    return ds


@pytest.mark.parametrize(
    ("code", "stored", "retryable"),
    [
        (0x0000, True, False),
        (0xB000, True, False),  # coercion of data elements: stored
        (0xB007, True, False),
        (0xA700, False, True),  # out of resources: later
        (0xA7FF, False, True),
        (0xA900, False, False),  # data set does not match the SOP class: never
        (0xC000, False, False),  # cannot understand
        (0x0122, False, False),  # SOP class not supported
        (None, False, True),  # no response: association aborted or timed out
    ],
)
def test_what_a_c_store_answer_means(code: int | None, stored: bool, retryable: bool) -> None:
    outcome = outcome_of(_status(code, "disk full"))
    assert (outcome.stored, outcome.retryable) == (stored, retryable)
    if code is not None and not stored:
        assert outcome.status_text == f"0x{code:04X}" and "disk full" in outcome.detail
