"""The CapabilityStatement served at `GET /fhir/metadata` (pure).

It states exactly what this server does and nothing more: create ServiceRequest and
ImagingStudy, transaction and batch Bundles, JSON only (the intake turns those into
events, it does not store them); and, when the results view is on, read and search of
the DiagnosticReports and Observations radtriage reported, with the search parameters
connectors/fhir/search.py implements (listed from its PARAMETERS, so the two cannot
drift; tests/unit/test_fhir_search.py checks it).
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from connectors.fhir.mapping import DICOM_UID_SYSTEM, V2_0203
from connectors.fhir.search import PARAMETERS

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


RESULT_DOCS = {
    "DiagnosticReport": (
        "radtriage's AI triage reports, read-only: the latest version of each (an amended "
        "re-read replaces the preliminary report, same id). Eventually consistent with the "
        "results topic; only the newest fhir_search.max_resources resources are kept."
    ),
    "Observation": (
        "The findings' Observations (probability, side, slices, BI-RADS, nodules), read-only, "
        "as kept with their report."
    ),
}
RESULT_PAGING = (
    " Results are sorted by _lastUpdated (ascending; _sort=-_lastUpdated for newest first) and "
    "paged with _count (default and maximum set by fhir_search) and the next link. Unknown "
    "parameters are ignored (the self link shows what was applied) unless the request says "
    "Prefer: handling=strict; an unsupported modifier or an unreadable value is a 400."
)


def result_resources() -> list[dict[str, Any]]:
    """read + search-type for each searchable type, with exactly the implemented parameters."""
    out = []
    for resource_type, params in PARAMETERS.items():
        search_params: dict[str, dict[str, Any]] = {}
        for param in params.values():
            search_params.setdefault(
                param.base,
                {
                    "name": param.base,
                    "definition": param.definition,
                    "type": param.type,
                    "documentation": param.documentation,
                },
            )
        out.append(
            {
                "type": resource_type,
                "documentation": RESULT_DOCS[resource_type] + RESULT_PAGING,
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "versioning": "versioned",
                "readHistory": False,
                "searchParam": list(search_params.values()),
            }
        )
    return out


def capability_statement(base_url: str, software_version: str, read_search: bool = True) -> dict[str, Any]:
    """The statement as JSON, validated against R4B on the way out. `read_search`: whether
    the results view is on (fhir_search.enabled)."""
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
                    "Orders: create only. A 201 means the order event is durably in Kafka "
                    "(acks=all); 503 with Retry-After means retry. Orders are not stored: not "
                    "read nor searched. Results: read and search only, when listed below."
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
                ]
                + (result_resources() if read_search else []),
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
