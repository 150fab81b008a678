"""The HTTP intake: one aiohttp server for FHIR R4 (`/fhir`), DICOMweb STOW-RS
(`/dicomweb/studies`) and health (`/healthz`)."""
