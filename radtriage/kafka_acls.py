"""Which Kafka resources each radtriage role may use (the secure cluster's ACLs)."""

from __future__ import annotations

# The process kinds that connect to Kafka, each with its own SCRAM user on a secure cluster.
ROLES = ("admin", "dicom", "hl7", "http", "worker", "operator")
