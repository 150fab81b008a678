"""The CapabilityStatement served at `GET /fhir/metadata` (pure).

It states exactly what this intake does and nothing more: create ServiceRequest and
ImagingStudy, transaction and batch Bundles, JSON only. No read or search: the
intake turns resources into events, it is not a FHIR store.
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from connectors.fhir.mapping import DICOM_UID_SYSTEM, V2_0203

FHIR_VERSION = "4.0.1"
# The date this statement last changed (CapabilityStatement.date is required).
STATEMENT_DATE = "2025-01-01"

_ACCESSION_RULE = (
    f"An identifier whose type.coding is {{system: {V2_0203}, code: ACSN}} carries the "
    "accession number and is required (422 otherwise)."
)

RESOURCE_DOCS = {
    "ServiceRequest": (
        "Imaging orders. " + _ACCESSION_RULE + " priority (stat|asap|urgent|routine) sets the "
        "triage lane; code is the procedure; reasonCode the indication; subject the patient "
        "(identifier or Patient/<id> reference; names are ignored)."
    ),
    "ImagingStudy": (
        f"Links a study to its order: identifier system {DICOM_UID_SYSTEM} value urn:oid:<StudyInstanceUID> "
        "is required, and the accession number either as an ACSN identifier or in "
        "basedOn[].identifier."
    ),
}


def capability_statement(base_url: str, software_version: str) -> dict[str, Any]:
    """The statement as JSON, validated against R4B on the way out."""
    statement: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": STATEMENT_DATE,
        "publisher": "radtriage",
        "kind": "instance",
        "software": {"name": "radtriage", "version": software_version},
        "implementation": {
            "description": "radtriage FHIR intake: orders for imaging triage",
            "url": f"{base_url}/fhir",
        },
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Create only. A 201 means the order event is durably in Kafka (acks=all); "
                    "503 with Retry-After means retry. Resources are not stored: read and "
                    "search are not supported."
                ),
                "resource": [
                    {
                        "type": resource_type,
                        "documentation": doc,
                        "interaction": [{"code": "create"}],
                        "versioning": "no-version",
                        "conditionalCreate": False,
                    }
                    for resource_type, doc in RESOURCE_DOCS.items()
                ],
                "interaction": [
                    {
                        "code": "transaction",
                        "documentation": "Every entry is validated before any is published; "
                        "one invalid entry refuses the whole Bundle.",
                    },
                    {"code": "batch", "documentation": "Each entry answered on its own."},
                ],
            }
        ],
    }
    CapabilityStatement.model_validate(statement)
    return statement
