"""Reports an EHR can file: every report shape radtriage produces (tests/support/findings.py)
checked by the HAPI FHIR validator (R4, offline; tests/support/fhir_validator.py), the
validator an EHR's FHIR stack would run. Zero errors; and the warnings left are only the
ones an offline validator cannot avoid or R4 gives no way to meet (listed here, so that a
new kind of warning fails the test until it is understood)."""

from __future__ import annotations

from collections import Counter

from processors.fhir_report import build_result_bundle
from tests.support.fhir_validator import validate
from tests.support.findings import gallery

# Without a terminology server LOINC, SNOMED CT, RadLex and radtriage's own code systems
# cannot be checked (HAPI says so as a warning); R4 lets no Device be an Observation's
# performer (the model is its `device`), so the best-practice performer warning stays; a
# study sent without a patient id has no subject to name.
UNAVOIDABLE = ("CodeSystem is unknown", "Unable to expand ValueSet", "should have a performer")
NO_PATIENT = "should have a subject"


def test_every_report_shape_validates_with_zero_errors_and_only_known_warnings() -> None:
    shapes = gallery()
    bundles = [build_result_bundle(f) for f in shapes.values()]
    messages = validate(bundles)
    names = list(shapes)
    errors = [m for m in messages if m.severity in ("error", "fatal")]
    assert errors == [], "\n".join(f"{names[int(m.file)]} {m.location}: {m.message}" for m in errors)
    warnings = [m for m in messages if m.severity == "warning"]
    unexpected = [
        m
        for m in warnings
        if not any(u in m.message for u in UNAVOIDABLE)
        and not (NO_PATIENT in m.message and names[int(m.file)] == "ich-no-patient-id")
    ]
    assert unexpected == [], "\n".join(f"{names[int(m.file)]} {m.location}: {m.message}" for m in unexpected)
    assert not any("dom-6" in m.message for m in messages)
    # The validator ran and looked at every bundle (its terminology warnings name each).
    assert {int(m.file) for m in warnings} == set(range(len(bundles)))
    print("HAPI FHIR", Counter(m.severity for m in messages))
