"""Which Kafka resources each radtriage role may use: the one definition of the ACLs.

Applied by an admin to the local secure cluster (`apply_acls`) and checked against the
Strimzi KafkaUsers of deploy/k8s/kafka/users.yaml (tests/unit/test_kafka_acls.py), so the
two cannot drift apart. Least privilege:
- connectors (dicom, hl7, http) only Write/Describe the intake topics they feed; the
  http process also serves the operator page and the FHIR read API, so it reads what
  those show (`http_reads`, without a consumer group) and writes `triage.audit`, where an
  acknowledgement (ack link or the page's button) is recorded: Kafka cannot restrict a
  producer to one kind of record, so the audit topic's readers trust an "ack" only as far
  as the http process's authentication (docs/ARCHITECTURE.md "Kafka roles");
- the worker reads intake (and writes imaging.instances: the quiet-period nudges of the
  studies it assembles) + its own intermediate topics, writes its outputs, owns the
  topics prefixed `<app_id>-` (join repartition topics, Faust changelogs and assignor) and
  its consumer group `<app_id>`; the alert ledger reads the alert topics without a group;
- operator = `radtriage replay`: reads dead letters, republishes to a consumed topic;
- keda: Describe only (lag of the worker group on the lane topics).
Idempotent producers need no cluster-level IdempotentWrite on Kafka >= 3.0 (KIP-679:
Write on a topic implies it), so no role has a cluster ACL.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from radtriage.settings import OUTBOX_STAGES, KafkaSettings, Settings, Topics

ResourceKind = Literal["topic", "group"]
PatternKind = Literal["literal", "prefix"]
# Strimzi's operation names (deploy/k8s/kafka/users.yaml).
Operation = Literal["Read", "Write", "Create", "Describe", "DescribeConfigs"]

# The process kinds with their own Kafka user; admin is the super user (topics, ACLs).
ROLES = ("admin", "dicom", "hl7", "http", "worker", "operator", "keda")
# Each role's SCRAM user name, as in deploy/k8s/kafka/users.yaml.
ROLE_USERS = {
    "admin": "admin",
    "dicom": "radtriage-dicom",
    "hl7": "radtriage-hl7",
    "http": "radtriage-http",
    "worker": "radtriage-worker",
    "operator": "radtriage-replay",
    "keda": "radtriage-keda",
}

PRODUCE: tuple[Operation, ...] = ("Write", "Describe")
CONSUME: tuple[Operation, ...] = ("Read", "Describe")
BOTH: tuple[Operation, ...] = ("Read", "Write", "Describe")


@dataclass(frozen=True)
class Grant:
    resource: ResourceKind
    name: str
    pattern: PatternKind
    operations: tuple[Operation, ...]


def _topics(names: Iterable[str], ops: tuple[Operation, ...]) -> list[Grant]:
    return [Grant("topic", n, "literal", ops) for n in names]


def http_reads(topics: Topics) -> list[str]:
    """What the http process reads: the operator page's topics (radtriage/operator/decode.py
    `topic_kinds`, kept a subset by tests/unit/test_kafka_acls.py) and the results topic
    for the FHIR read API. Never the intake topics: what was sent in is not shown raw."""
    t = topics
    lanes = [t.requests_stat, t.requests_urgent, t.requests_routine]
    return [*t.alert_topics(), t.findings, t.results_fhir, *lanes, t.audit, t.deadletter, t.studies]


def role_grants(settings: Settings) -> dict[str, list[Grant]]:
    """role -> its grants (admin: none, it is a super user)."""
    t, app = settings.topics, settings.streams.app_id
    lanes = [t.requests_stat, t.requests_urgent, t.requests_routine]
    return {
        "admin": [],
        "dicom": _topics([t.instances], PRODUCE),
        # The HL7 listener dead-letters the PHI-free summary of a refused message itself.
        "hl7": _topics([t.orders, t.encounters, t.deadletter], PRODUCE),
        "http": [
            *_topics([t.instances, t.orders], PRODUCE),
            *_topics([r for r in http_reads(t) if r != t.audit], CONSUME),
            # Acknowledgements (connectors/http/notify_ack.py, the operator page's button).
            *_topics([t.audit], BOTH),
        ],
        "worker": [
            *_topics([t.orders, t.encounters], CONSUME),
            # Writes to the intake topic too: the quiet-period nudge of an assembling study
            # (streams/agents.py) goes through imaging.instances to reach its partition.
            # Reads the results topic too: the reports ledger (streams/published_ledger.py).
            *_topics(
                [t.instances, t.studies, *lanes, t.findings, t.results_fhir, *t.alert_topics()],
                BOTH,
            ),
            # Reads the audit topic too: the notify stage's acknowledgements and its own record
            # of who was told (streams/stages/notify.py).
            *_topics([t.audit], BOTH),
            # Reads dead letters too: the operators' digests (streams/stages/notify_ops.py).
            *_topics([t.deadletter], BOTH),
            Grant("topic", f"{app}-", "prefix", ("Read", "Write", "Create", "Describe", "DescribeConfigs")),
            Grant("group", app, "literal", CONSUME),
        ],
        "keda": [*_topics(lanes, ("Describe",)), Grant("group", app, "literal", ("Describe",))],
        "operator": [
            *_topics([t.deadletter], CONSUME),
            *_topics([t.instances, t.studies, t.orders, t.encounters, *lanes, t.findings], PRODUCE),
            Grant("topic", f"{app}-studies-by-", "prefix", PRODUCE),
            # Replayed notify dead letters (streams/stages/notify.py).
            Grant("topic", f"{app}-notify-retry", "literal", PRODUCE),
            # Replayed ehr-fhir dead letters: the report, back on its topic (streams/stages/ehr_fhir.py).
            *_topics([t.results_fhir], PRODUCE),
            # Replayed delivery dead letters go back on the stage's outbox (streams/stages/outbox.py).
            *(Grant("topic", settings.streams.outbox_topic(s), "literal", PRODUCE) for s in OUTBOX_STAGES),
        ],
    }


def kafka_python_acls(principal: str, grants: Iterable[Grant]) -> list[object]:
    """kafka-python ACL objects (one per operation) allowing `principal` (e.g. User:radtriage-dicom)."""
    from kafka.admin import (
        ACL,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourceType,
    )

    kinds = {"topic": ResourceType.TOPIC, "group": ResourceType.GROUP}
    patterns = {"literal": ACLResourcePatternType.LITERAL, "prefix": ACLResourcePatternType.PREFIXED}
    ops = {
        "Read": ACLOperation.READ,
        "Write": ACLOperation.WRITE,
        "Create": ACLOperation.CREATE,
        "Describe": ACLOperation.DESCRIBE,
        "DescribeConfigs": ACLOperation.DESCRIBE_CONFIGS,
    }
    return [
        ACL(
            principal,
            "*",
            ops[op],
            ACLPermissionType.ALLOW,
            ResourcePattern(kinds[g.resource], g.name, patterns[g.pattern]),
        )
        for g in grants
        for op in g.operations
    ]


def apply_acls(admin_kafka: KafkaSettings, settings: Settings) -> int:
    """Create every role's ACLs (as the super user); returns how many. Idempotent on the broker."""
    from kafka import KafkaAdminClient

    from radtriage.kafka_clients import kafka_python_kwargs

    acls = [
        acl
        for role, grants in role_grants(settings).items()
        for acl in kafka_python_acls(f"User:{ROLE_USERS[role]}", grants)
    ]
    admin = KafkaAdminClient(request_timeout_ms=15000, **kafka_python_kwargs(admin_kafka))
    try:
        result = admin.create_acls(acls)
    finally:
        admin.close()
    failed = result.get("failed", []) if isinstance(result, dict) else []
    if failed:
        raise RuntimeError(f"creating ACLs failed: {failed[:3]}")
    return len(acls)
