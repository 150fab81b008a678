"""FHIR R4 intake: ServiceRequest / ImagingStudy (and Bundles of them) → `imaging.orders`."""
