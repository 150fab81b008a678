"""`radtriage demo`'s PACS column: what the pacs-export stage's audit records say each
study left in a PACS (radtriage/demo.py)."""

from __future__ import annotations

from typing import Any

from radtriage.demo import Outcome, _apply, pacs_entry
from radtriage.settings import Settings


def _export(decision: str, what: str, destination: str = "orthanc") -> dict[str, Any]:
    return {
        "study_uid": "1.2.3",
        "stage": "export",
        "decision": decision,
        "detail": {"object": what, "destination": destination, "status": "0x0000"},
    }


def test_stored_and_failed_objects_are_listed_with_their_destination_and_retries_are_not() -> None:
    assert pacs_entry("sr_stored", {"object": "sr", "destination": "orthanc"}) == ["sr@orthanc"]
    assert pacs_entry("seg_failed", {"object": "seg", "destination": "pacs2"}) == ["seg@pacs2 failed"]
    assert pacs_entry("sr_retrying", {"object": "sr", "destination": "orthanc"}) == []


def test_the_audit_records_of_a_bleed_fill_the_pacs_column_in_their_order() -> None:
    settings = Settings()
    outcome = Outcome(case="head CT, bleed", study_uid="1.2.3", expected="alert")
    for decision, what in (
        ("sr_retrying", "sr"),
        ("sr_stored", "sr"),
        ("seg_stored", "seg"),
        ("kos_stored", "kos"),
    ):
        _apply(outcome, settings.topics.audit, _export(decision, what), settings)
    assert outcome.pacs == ["sr@orthanc", "seg@orthanc", "kos@orthanc"]
    # The column does not change what the demo checks: the study's outcome is judged as before.
    assert not outcome.ok  # no alert or report was applied here
