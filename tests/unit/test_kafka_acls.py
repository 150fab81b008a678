"""radtriage/kafka_acls.py (applied to the local secure cluster) and deploy/k8s/kafka/users.yaml
(Strimzi's KafkaUsers) grant exactly the same, role by role."""

from __future__ import annotations

from typing import Any

import yaml

from radtriage.kafka_acls import ROLE_USERS, ROLES, Grant, kafka_python_acls, role_grants
from radtriage.operator.decode import topic_kinds
from radtriage.settings import REPO_ROOT, Settings

USERS = REPO_ROOT / "deploy" / "k8s" / "kafka" / "users.yaml"


def _yaml_users() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(USERS.read_text()) if d and d.get("kind") == "KafkaUser"]
    return {d["metadata"]["name"]: d for d in docs}


def _as_set(grants: list[Grant]) -> set[tuple[str, str, str, str]]:
    return {(g.resource, g.name, g.pattern, op) for g in grants for op in g.operations}


def _yaml_set(user: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    return {
        (acl["resource"]["type"], acl["resource"]["name"], acl["resource"].get("patternType", "literal"), op)
        for acl in user["spec"]["authorization"]["acls"]
        for op in acl["operations"]
    }


def test_every_kafka_user_in_k8s_is_a_role_with_the_same_grants() -> None:
    grants = role_grants(Settings())
    users = _yaml_users()
    by_user = {ROLE_USERS[role]: role for role in ROLES if role != "admin"}
    assert set(users) == set(by_user), "users.yaml and ROLE_USERS name different users"
    for name, user in users.items():
        assert _yaml_set(user) == _as_set(grants[by_user[name]]), name


def test_connectors_only_write_intake_topics() -> None:
    t = Settings().topics
    intake = {t.instances, t.orders, t.encounters, t.deadletter}
    for role in ("dicom", "hl7"):
        for g in role_grants(Settings())[role]:
            assert g.resource == "topic" and g.pattern == "literal" and g.name in intake
            assert set(g.operations) <= {"Write", "Describe"}


def test_the_http_role_reads_what_its_pages_show_and_writes_intake_and_acknowledgements_only() -> None:
    t = Settings().topics
    grants = role_grants(Settings())["http"]
    assert all(g.resource == "topic" and g.pattern == "literal" for g in grants)
    writes = {g.name for g in grants if "Write" in g.operations}
    assert writes == {t.instances, t.orders, t.audit}
    reads = {g.name for g in grants if "Read" in g.operations}
    # Everything the operator page decodes, and the results for the FHIR read API.
    assert set(topic_kinds(t)) <= reads
    assert t.results_fhir in reads
    # Never the raw intake: what was sent in is not shown as it came.
    assert not reads & {t.instances, t.orders, t.encounters}


def test_the_worker_cannot_write_orders_or_adt_and_owns_its_prefix_and_group() -> None:
    s = Settings()
    worker = role_grants(s)["worker"]
    for g in worker:
        if g.name in (s.topics.orders, s.topics.encounters):
            assert "Write" not in g.operations
    # The two it needs beyond the obvious: imaging.instances carries its quiet-period nudges,
    # and the reports ledger reads the results topic back (streams/published_ledger.py).
    ops = {g.name: set(g.operations) for g in worker if g.resource == "topic"}
    assert {"Read", "Write"} <= ops[s.topics.instances]
    assert {"Read", "Write"} <= ops[s.topics.results_fhir]
    assert Grant("group", s.streams.app_id, "literal", ("Read", "Describe")) in worker
    assert any(
        g.pattern == "prefix" and g.name == f"{s.streams.app_id}-" and "Create" in g.operations
        for g in worker
    )


def test_acl_objects_for_kafka_python() -> None:
    acls = kafka_python_acls("User:radtriage-hl7", role_grants(Settings())["hl7"])
    assert len(acls) == 6  # 3 topics x (Write, Describe)
    assert {a.principal for a in acls} == {"User:radtriage-hl7"}  # type: ignore[attr-defined]
