"""Internal repartition topics of the order-study join (`<app_id>-studies-by-patient`,
`<app_id>-studies-by-accession`): a ready study plus what the join learned about it so far.

Not part of the external contract; versioned like every event so that a worker of
another version reading it fails loudly (dead letter) instead of misreading it.
"""

from __future__ import annotations

from schemas.base import Event
from schemas.orders import PatientClass
from schemas.studies import StudyEvent


class StudyContext(Event):
    study: StudyEvent
    # From the patient-location table (ADT) when the study's patient id was known there.
    patient_class: PatientClass = "unknown"
    # e.g. "hl7 ADT^A04": where the patient class came from, for the audit trail.
    patient_class_source: str = ""
    # Set once the patient-location stage has looked (found or not), so it is not asked twice.
    patient_checked: bool = False
    # The route stage's decision (streams/routing.decide): the rules to run for this
    # arrival of the study, each with the request id its finding amends ("" for a first
    # read). None: every rule that matches (a context from before the field).
    run_rules: dict[str, str] | None = None
