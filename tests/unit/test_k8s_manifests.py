"""deploy/k8s validated offline: schemas for every kind, then the cross-references.

Core kinds (Deployment, Service, NetworkPolicy, …) are checked against the Kubernetes
OpenAPI-derived JSON schemas that the `kubernetes-validate` package bundles, in strict
mode (an unknown field is an error, as `kubectl apply --validate=strict` would say).
The custom resources (Strimzi, KEDA) are checked against the hand-written schema subsets
in deploy/k8s/schemas/crd-subsets.yaml. A kind with neither fails: nothing goes unchecked.

Then what no schema can see: every topic radtriage uses has a KafkaTopic and the
co-partitioned ones agree on their partition count (and with kafka.partitions), Services
and PDBs select real Deployments on real ports, the ConfigMap's settings exist in
radtriage/settings.py, connectors may only produce to intake topics, each pod uses its
own Kafka user, and so on. Each check is a function returning its problems, so the
tests at the end can show that a broken manifest is rejected.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from radtriage.kafka_acls import ROLE_USERS, http_reads
from radtriage.settings import REPO_ROOT, Settings, StreamSettings, Topics

K8S = REPO_ROOT / "deploy" / "k8s"
# The oldest Kubernetes minor these manifests target (Strimzi 0.47 and KEDA 2.x support it).
KUBERNETES_VERSION = "1.30"
NAMESPACE = "radtriage"
CLUSTER = "radtriage"
CLUSTER_SCOPED = {"Namespace", "PriorityClass"}
CRD_KINDS = {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser", "ScaledObject", "TriggerAuthentication"}
LANES = ("stat", "urgent", "routine")

# Environment variables the manifests set ahead of the code (OPERATIONS.md, "Not covered
# yet"): radtriage ignores them until these settings exist. Anything else RADTRIAGE_… must
# name a real setting.
PLANNED_ENV = {"RADTRIAGE_STREAMS__LANES"}
# Secrets written by the operators, not by this repository.
STRIMZI_CA_SECRET = f"{CLUSTER}-cluster-ca-cert"

Doc = dict[str, Any]


# ---------------------------------------------------------------- loading


def kustomization() -> Doc:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifest_files() -> list[Path]:
    return [K8S / r for r in kustomization()["resources"]]


@cache
def _load() -> tuple[tuple[str, Doc], ...]:
    out = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((str(path.relative_to(K8S)), doc))
    return tuple(out)


def all_docs() -> list[Doc]:
    return [copy.deepcopy(d) for _, d in _load()]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind]


def by_name(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in of_kind(docs, kind)}


def pod_spec(deployment: Doc) -> Doc:
    return deployment["spec"]["template"]["spec"]


def template_labels(deployment: Doc) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def containers(deployment: Doc) -> list[Doc]:
    spec = pod_spec(deployment)
    return spec.get("initContainers", []) + spec["containers"]


def config_settings(docs: list[Doc]) -> Doc:
    cm = by_name(docs, "ConfigMap")["radtriage-config"]
    return yaml.safe_load(cm["data"]["radtriage.yaml"])


def settings_from(docs: list[Doc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    path = tmp_path / "radtriage.yaml"
    path.write_text(yaml.safe_dump(config_settings(docs)))
    for var in [v for v in os.environ if v.startswith("RADTRIAGE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("RADTRIAGE_CONFIG", str(path))
    return Settings()


def topic_partitions(docs: list[Doc]) -> dict[str, int]:
    return {
        t["spec"].get("topicName", t["metadata"]["name"]): t["spec"]["partitions"]
        for t in of_kind(docs, "KafkaTopic")
    }


def co_partitioned_topics() -> list[str]:
    """Every topic a worker consumes, plus the alert topics (the alert ledger reads
    partition p of them for the findings of partition p: same key, same count)."""
    t = Topics()
    return [
        t.instances,
        t.studies,
        t.orders,
        t.encounters,
        *StreamSettings().internal_topics(),
        t.requests_stat,
        t.requests_urgent,
        t.requests_routine,
        t.findings,
        t.alert_topic("ich"),
        t.alert_topic("stroke"),
        # Read with the alert topics by the notify agent (streams/stages/notify.py).
        t.audit,
    ]


def intake_topics() -> set[str]:
    t = Topics()
    return {t.instances, t.orders, t.encounters, t.deadletter}


# ---------------------------------------------------------------- schema checks


@cache
def crd_schemas() -> dict[str, Doc]:
    raw = yaml.safe_load((K8S / "schemas" / "crd-subsets.yaml").read_text())
    defs = raw.pop("$defs")
    return {kind: {"$defs": defs, **schema} for kind, schema in raw.items()}


def schema_problems(doc: Doc) -> list[str]:
    """Validate one manifest: Kubernetes schemas for core kinds, the subsets for CRDs."""
    kind = doc.get("kind", "?")
    name = doc.get("metadata", {}).get("name", "?")
    where = f"{kind}/{name}"
    if kind in crd_schemas():
        validator = jsonschema.Draft202012Validator(crd_schemas()[kind])
        return [
            f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{where}: no schema for {doc.get('apiVersion')} {kind} (add one, or fix the kind)"]
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {'.'.join(map(str, exc.path)) or '<root>'}: {exc.message}"]
    return []


# ---------------------------------------------------------------- cross-reference checks


def check_metadata(docs: list[Doc]) -> list[str]:
    problems = []
    for d in docs:
        meta, kind = d["metadata"], d["kind"]
        if kind in CLUSTER_SCOPED:
            if "namespace" in meta:
                problems.append(f"{kind}/{meta['name']}: cluster-scoped, must not name a namespace")
        elif meta.get("namespace") != NAMESPACE:
            problems.append(f"{kind}/{meta['name']}: namespace must be {NAMESPACE}")
        if kind in {"KafkaNodePool", "KafkaTopic", "KafkaUser"}:
            if meta.get("labels", {}).get("strimzi.io/cluster") != CLUSTER:
                problems.append(f"{kind}/{meta['name']}: strimzi.io/cluster must be {CLUSTER}")
    if [d["metadata"]["name"] for d in of_kind(docs, "Kafka")] != [CLUSTER]:
        problems.append(f"exactly one Kafka named {CLUSTER} expected")
    return problems


def check_kafka_cluster(docs: list[Doc]) -> list[str]:
    problems = []
    kafka = by_name(docs, "Kafka")[CLUSTER]["spec"]["kafka"]
    config = kafka.get("config", {})
    if config.get("default.replication.factor") != 3:
        problems.append("Kafka: default.replication.factor must be 3")
    if config.get("min.insync.replicas") != 2:
        problems.append("Kafka: min.insync.replicas must be 2")
    pools = of_kind(docs, "KafkaNodePool")
    brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
    controllers = sum(p["spec"]["replicas"] for p in pools if "controller" in p["spec"]["roles"])
    if brokers < 3:
        problems.append(f"KafkaNodePools: {brokers} brokers, replication factor 3 needs at least 3")
    if controllers < 3 or controllers % 2 == 0:
        problems.append(f"KafkaNodePools: {controllers} controllers, a KRaft quorum needs an odd number >= 3")
    listeners = kafka["listeners"]
    if any(not listener["tls"] for listener in listeners):
        problems.append("Kafka: every listener must use TLS")
    if any(listener.get("authentication", {}).get("type") != "scram-sha-512" for listener in listeners):
        problems.append("Kafka: every listener must authenticate with scram-sha-512")
    if kafka.get("authorization", {}).get("type") != "simple":
        problems.append("Kafka: authorization must be simple (ACLs)")
    return problems


def check_topics(docs: list[Doc], settings: Settings) -> list[str]:
    problems = []
    parts = topic_partitions(docs)
    wanted = settings.topics.all() + settings.streams.internal_topics()
    for topic in wanted:
        if topic not in parts:
            problems.append(f"topic {topic} (radtriage/settings.py) has no KafkaTopic")
    for topic in parts:
        if topic not in wanted:
            problems.append(f"KafkaTopic {topic} is not a radtriage topic (stale or misspelt)")
    copart = {t: parts[t] for t in co_partitioned_topics() if t in parts}
    if len(set(copart.values())) > 1:
        problems.append(f"co-partitioned topics disagree on partitions: {copart}")
    if copart and settings.kafka.partitions not in set(copart.values()):
        problems.append(
            f"kafka.partitions in the ConfigMap ({settings.kafka.partitions}) differs from the "
            f"co-partitioned topics ({sorted(set(copart.values()))}): Faust's changelogs would too"
        )
    if settings.kafka.replication_factor != 3:
        problems.append("kafka.replication_factor in the ConfigMap must be 3 (Faust's changelogs)")
    for t in of_kind(docs, "KafkaTopic"):
        name, spec = t["metadata"]["name"], t["spec"]
        if spec["replicas"] != 3:
            problems.append(f"KafkaTopic {name}: replicas must be 3")
        if int(spec.get("config", {}).get("min.insync.replicas", 2)) < 2:
            problems.append(f"KafkaTopic {name}: min.insync.replicas below 2")
    return problems


def check_services(docs: list[Doc]) -> list[str]:
    problems = []
    deployments = of_kind(docs, "Deployment")
    for svc in of_kind(docs, "Service"):
        name = svc["metadata"]["name"]
        selector = svc["spec"].get("selector", {})
        matched = [d for d in deployments if selects(selector, template_labels(d))]
        if len(matched) != 1:
            problems.append(f"Service {name}: selects {len(matched)} Deployments, expected 1")
            continue
        ports = [p for c in containers(matched[0]) for p in c.get("ports", [])]
        by_port_name = {p["name"]: p["containerPort"] for p in ports if "name" in p}
        numbers = {p["containerPort"] for p in ports}
        for sp in svc["spec"]["ports"]:
            target = sp.get("targetPort", sp["port"])
            if isinstance(target, str) and target not in by_port_name:
                problems.append(f"Service {name}: targetPort {target!r} is no named port of its pods")
            elif isinstance(target, int) and target not in numbers:
                problems.append(f"Service {name}: targetPort {target} is no container port of its pods")
    return problems


def check_probes(docs: list[Doc]) -> list[str]:
    problems = []
    for d in of_kind(docs, "Deployment"):
        for c in containers(d):
            named = {p["name"] for p in c.get("ports", []) if "name" in p}
            numbers = {p["containerPort"] for p in c.get("ports", [])}
            for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(probe_kind) or {}
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    port = (probe.get(handler) or {}).get("port")
                    if port is not None and port not in named | numbers:
                        problems.append(
                            f"{d['metadata']['name']}: {probe_kind} port {port!r} is not declared"
                        )
    return problems


def check_pdbs(docs: list[Doc]) -> list[str]:
    problems = []
    deployments = of_kind(docs, "Deployment")
    covered: set[str] = set()
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"].get("matchLabels", {})
        matched = [d["metadata"]["name"] for d in deployments if selects(selector, template_labels(d))]
        if len(matched) != 1:
            problems.append(f"PDB {pdb['metadata']['name']}: selects {matched}, expected one Deployment")
        covered.update(matched)
    for d in deployments:
        if d["metadata"]["name"] not in covered:
            problems.append(f"Deployment {d['metadata']['name']} has no PodDisruptionBudget")
    return problems


def check_deployments(docs: list[Doc]) -> list[str]:
    """Selectors, spread constraints, security context, resources, images, references."""
    problems = []
    pvcs = set(by_name(docs, "PersistentVolumeClaim"))
    configmaps = set(by_name(docs, "ConfigMap"))
    users = set(by_name(docs, "KafkaUser"))
    secrets = set(by_name(docs, "Secret")) | users | {STRIMZI_CA_SECRET}
    for d in of_kind(docs, "Deployment"):
        name, spec = d["metadata"]["name"], pod_spec(d)
        if not selects(d["spec"]["selector"]["matchLabels"], template_labels(d)):
            problems.append(f"{name}: selector does not match its pod labels")
        for tsc in spec.get("topologySpreadConstraints", []):
            if not selects(tsc["labelSelector"].get("matchLabels", {}), template_labels(d)):
                problems.append(f"{name}: topologySpreadConstraint does not select its own pods")
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{name}: pod must set runAsNonRoot")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: pod must use the RuntimeDefault seccomp profile")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: no radtriage pod needs a service account token")
        for c in containers(d):
            where = f"{name}/{c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem must be true")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: must drop ALL capabilities")
            req = c.get("resources", {}).get("requests", {})
            if not {"cpu", "memory"} <= set(req):
                problems.append(f"{where}: needs cpu and memory requests")
            if "memory" not in c.get("resources", {}).get("limits", {}):
                problems.append(f"{where}: needs a memory limit")
            image = c["image"]
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                problems.append(f"{where}: image {image} needs a fixed tag")
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            declared = {v["name"] for v in spec.get("volumes", [])}
            for missing in sorted(mounts - declared):
                problems.append(f"{where}: mounts undeclared volume {missing}")
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] not in secrets:
                    problems.append(f"{where}: env {env['name']} reads unknown Secret {ref['name']}")
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in pvcs:
                problems.append(f"{name}: volume {v['name']} claims an unknown PVC")
            if "configMap" in v and v["configMap"]["name"] not in configmaps:
                problems.append(f"{name}: volume {v['name']} uses an unknown ConfigMap")
            if "secret" in v and v["secret"]["secretName"] not in secrets:
                problems.append(f"{name}: volume {v['name']} uses an unknown Secret")
    return problems


def cli_commands() -> set[str]:
    from radtriage.cli import main

    return set(main.commands)


def check_commands(docs: list[Doc]) -> list[str]:
    problems = []
    known = cli_commands()
    for d in of_kind(docs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            cmd = c.get("command", [])
            if cmd[:1] == ["radtriage"] and (len(cmd) < 2 or cmd[1] not in known):
                problems.append(f"{d['metadata']['name']}: `{' '.join(cmd)}` is not a radtriage command")
    workers = {
        template_labels(d).get("radtriage.io/lane"): d
        for d in of_kind(docs, "Deployment")
        if template_labels(d).get("app.kubernetes.io/component") == "worker"
    }
    for lane in LANES:
        if lane not in workers:
            problems.append(f"no worker Deployment for the {lane} lane")
        elif workers[lane]["spec"]["template"]["spec"]["containers"][0]["command"] != ["radtriage", "worker"]:
            problems.append(f"the {lane} worker must run `radtriage worker`")
    return problems


def _field_problems(model: type[BaseModel], data: Any, path: str) -> list[str]:
    if not isinstance(data, dict):
        return []
    problems = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            problems.append(f"ConfigMap radtriage.yaml: {path}{key} is no setting of {model.__name__}")
            continue
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            problems.extend(_field_problems(sub, value, f"{path}{key}."))
    return problems


def _env_path_exists(var: str) -> bool:
    parts = var.removeprefix("RADTRIAGE_").lower().split("__")
    model: Any = Settings
    for part in parts:
        is_model = isinstance(model, type) and issubclass(model, BaseModel)
        field = model.model_fields.get(part) if is_model else None
        if field is None:
            return False
        model = field.annotation
    return True


def check_settings(docs: list[Doc], settings: Settings) -> list[str]:
    """The ConfigMap's settings are real settings; env vars too; addresses resolve."""
    problems = _field_problems(Settings, config_settings(docs), "")
    for d in of_kind(docs, "Deployment"):
        for c in containers(d):
            for env in c.get("env", []):
                var = env["name"]
                if var in {"RADTRIAGE_CONFIG", "RADTRIAGE_HOME"} or not var.startswith("RADTRIAGE_"):
                    continue
                if var not in PLANNED_ENV | MODEL_ENV and not _env_path_exists(var):
                    problems.append(f"{d['metadata']['name']}: {var} names no setting")
    # Kafka: the bootstrap address is the Strimzi bootstrap Service on the TLS listener.
    listener_ports = {li["port"] for li in by_name(docs, "Kafka")[CLUSTER]["spec"]["kafka"]["listeners"]}
    for server in settings.kafka.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        if not host.startswith(f"{CLUSTER}-kafka-bootstrap") or int(port) not in listener_ports:
            problems.append(f"kafka.bootstrap_servers {server} is not a listener of the Kafka {CLUSTER}")
    if settings.kafka.embedded or settings.triton.embedded:
        problems.append("kafka.embedded and triton.embedded must be false in a cluster")
    # Triton: the URLs name the Triton Service and its ports.
    services = by_name(docs, "Service")
    for url in (settings.triton.grpc_url, settings.triton.http_url):
        host, _, port = url.rpartition(":")
        svc = services.get(host.split(".")[0])
        if svc is None or int(port) not in {p["port"] for p in svc["spec"]["ports"]}:
            problems.append(f"Triton URL {url} is no port of a Service here")
    # Connectors: each listener's Service port is the port the setting binds.
    expected = {
        "radtriage-dicom": settings.dicom.port,
        "radtriage-hl7": settings.hl7.port,
        "radtriage-http": settings.http.port,
    }
    deployments = by_name(docs, "Deployment")
    for name, listen_port in expected.items():
        svc, dep = services.get(name), deployments.get(name)
        if svc is None or dep is None:
            problems.append(f"{name}: a Deployment and a Service are both needed")
            continue
        if listen_port not in {p["containerPort"] for c in containers(dep) for p in c.get("ports", [])}:
            problems.append(f"{name}: the container does not declare the configured port {listen_port}")
        if listen_port not in {p["port"] for p in svc["spec"]["ports"]}:
            problems.append(f"{name}: the Service does not expose the configured port {listen_port}")
    return problems


def check_routing_rules_copy(docs: list[Doc]) -> list[str]:
    shipped = yaml.safe_load((REPO_ROOT / "deploy" / "routing" / "rules.yaml").read_text())
    copied = yaml.safe_load(by_name(docs, "ConfigMap")["radtriage-config"]["data"]["rules.yaml"])
    return [] if shipped == copied else ["ConfigMap rules.yaml differs from deploy/routing/rules.yaml"]


def kafka_user_of(deployment: Doc) -> str | None:
    for c in containers(deployment):
        for env in c.get("env", []):
            if env["name"] == "RADTRIAGE_KAFKA__SASL_PASSWORD":
                return env["valueFrom"]["secretKeyRef"]["name"]
    return None


def check_kafka_users(docs: list[Doc], settings: Settings) -> list[str]:
    problems = []
    users = by_name(docs, "KafkaUser")
    for name, kafka_user in users.items():
        if kafka_user["spec"].get("authentication", {}).get("type") != "scram-sha-512":
            problems.append(f"KafkaUser {name}: must authenticate with scram-sha-512")
        if kafka_user["spec"].get("authorization", {}).get("type") != "simple":
            problems.append(f"KafkaUser {name}: must carry simple (ACL) authorization")
    intake = intake_topics()
    for d in of_kind(docs, "Deployment"):
        component = template_labels(d).get("app.kubernetes.io/component")
        if template_labels(d).get("radtriage.io/kafka-client") != "true":
            continue
        name, user = d["metadata"]["name"], kafka_user_of(d)
        if user not in users:
            problems.append(f"{name}: Kafka client without its own KafkaUser ({user})")
            continue
        usernames = {
            env.get("value")
            for c in containers(d)
            for env in c.get("env", [])
            if env["name"] == "RADTRIAGE_KAFKA__SASL_USERNAME"
        }
        if usernames != {user}:
            problems.append(f"{name}: SASL user {usernames} and password Secret {user} differ")
        acls = users[user]["spec"]["authorization"]["acls"]
        if component == "connector":
            # The http process also serves the operator page and the FHIR read API: it may
            # read what they show and record acknowledgements on the audit topic, no more.
            http = user == ROLE_USERS["http"]
            shown = set(http_reads(settings.topics)) if http else set()
            for acl in acls:
                res, ops = acl["resource"], set(acl["operations"])
                literal_topic = res["type"] == "topic" and res.get("patternType", "literal") == "literal"
                allowed: set[str] = set()
                if literal_topic and res["name"] in intake:
                    allowed |= {"Write", "Describe"}
                if literal_topic and res["name"] in shown:
                    allowed |= {"Read", "Describe"}
                if http and literal_topic and res["name"] == settings.topics.audit:
                    allowed |= {"Write"}
                if not ops <= allowed:
                    problems.append(
                        f"KafkaUser {user} ({name}): connectors may only Write/Describe intake "
                        f"topics, not {sorted(ops)} on {res['type']} {res.get('name')}"
                    )
        if component == "worker":
            groups = [
                a
                for a in acls
                if a["resource"]["type"] == "group" and a["resource"]["name"] == settings.streams.app_id
            ]
            if not any("Read" in a["operations"] for a in groups):
                problems.append(f"KafkaUser {user}: workers must Read the group {settings.streams.app_id}")
            writes = {
                a["resource"]["name"]
                for a in acls
                if a["resource"]["type"] == "topic" and {"Write", "All"} & set(a["operations"])
            }
            # imaging.instances is the one intake topic a worker writes: the quiet-period nudge
            # of a study being assembled (streams/agents.py) must reach that study's partition
            # of it. Orders and ADT only ever come from the connectors.
            forbidden = writes & {settings.topics.orders, settings.topics.encounters}
            if forbidden:
                problems.append(f"KafkaUser {user}: workers must not write the intake topics {forbidden}")
    return problems


def check_scaling(docs: list[Doc], settings: Settings) -> list[str]:
    problems = []
    deployments = by_name(docs, "Deployment")
    parts = topic_partitions(docs)
    auths = by_name(docs, "TriggerAuthentication")
    total_max = 0
    scaled = set()
    for so in of_kind(docs, "ScaledObject"):
        name, spec = so["metadata"]["name"], so["spec"]
        target = spec["scaleTargetRef"]["name"]
        if target not in deployments:
            problems.append(f"ScaledObject {name}: scales unknown Deployment {target}")
            continue
        scaled.add(target)
        if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
            problems.append(f"ScaledObject {name}: minReplicaCount above maxReplicaCount")
        if template_labels(deployments[target]).get("app.kubernetes.io/component") == "worker":
            total_max += spec.get("maxReplicaCount", 100)
        for trig in spec["triggers"]:
            if trig["type"] != "kafka":
                continue
            meta = trig["metadata"]
            if meta["consumerGroup"] != settings.streams.app_id:
                problems.append(f"ScaledObject {name}: consumer group is {settings.streams.app_id}")
            if meta.get("topic") not in parts:
                problems.append(f"ScaledObject {name}: topic {meta.get('topic')} has no KafkaTopic")
            if meta["bootstrapServers"] != settings.kafka.bootstrap_servers:
                problems.append(f"ScaledObject {name}: bootstrapServers differ from kafka.bootstrap_servers")
            ref = trig.get("authenticationRef", {}).get("name")
            if ref not in auths:
                problems.append(f"ScaledObject {name}: unknown TriggerAuthentication {ref}")
    for d in deployments.values():
        if (
            template_labels(d).get("app.kubernetes.io/component") == "worker"
            and d["metadata"]["name"] not in scaled
        ):
            problems.append(f"worker Deployment {d['metadata']['name']} has no ScaledObject")
    lane_parts = parts.get(settings.topics.requests_stat, 0)
    if total_max > lane_parts:
        problems.append(
            f"worker maxReplicaCount adds up to {total_max}, above the {lane_parts} partitions: "
            "the extra consumers would sit idle"
        )
    secrets = by_name(docs, "Secret")
    users = set(by_name(docs, "KafkaUser"))
    for name, auth in auths.items():
        for ref in auth["spec"].get("secretTargetRef", []):
            ok = (
                (ref["name"] in secrets and ref["key"] in secrets[ref["name"]].get("stringData", {}))
                or (ref["name"] in users and ref["key"] == "password")
                or (ref["name"] == STRIMZI_CA_SECRET and ref["key"] == "ca.crt")
            )
            if not ok:
                problems.append(f"TriggerAuthentication {name}: {ref['name']}/{ref['key']} does not exist")
    return problems


def check_no_secret_values(docs: list[Doc]) -> list[str]:
    """Secrets in the repository carry only non-secret connection parameters."""
    allowed = {"sasl", "tls", "username"}
    problems = []
    for s in of_kind(docs, "Secret"):
        if s.get("data") or set(s.get("stringData", {})) - allowed:
            problems.append(f"Secret {s['metadata']['name']}: holds values beyond {sorted(allowed)}")
    return problems


def _policies_for(docs: list[Doc], labels: dict[str, str], direction: str) -> list[Doc]:
    out = []
    for p in of_kind(docs, "NetworkPolicy"):
        spec = p["spec"]
        sel = spec["podSelector"].get("matchLabels", {})
        if direction in spec.get("policyTypes", []) and (not sel or selects(sel, labels)):
            out.append(spec)
    return out


def _ports(rules: list[Doc]) -> set[int]:
    return {port["port"] for r in rules for port in r.get("ports", [])}


def _rules_without_ports(rules: list[Doc]) -> list[Doc]:
    return [r for r in rules if not r.get("ports")]


def check_network_policies(docs: list[Doc]) -> list[str]:
    problems = []
    denies = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    if not denies:
        problems.append("no default-deny NetworkPolicy (ingress and egress) for the namespace")
    allowed_egress = {
        "worker": {53, 9093, 8001, 4318},  # DNS, Kafka TLS, Triton gRPC, OTLP traces
        "connector": {53, 9093, 4318},
        "inference": {53, 4318},
    }
    for d in of_kind(docs, "Deployment"):
        name, labels = d["metadata"]["name"], template_labels(d)
        component = labels.get("app.kubernetes.io/component")
        egress = [r for p in _policies_for(docs, labels, "Egress") for r in p.get("egress", [])]
        if _rules_without_ports(egress):
            problems.append(f"{name}: an egress rule without ports opens every port")
        if component in allowed_egress and _ports(egress) - allowed_egress[component]:
            problems.append(
                f"{name}: egress to ports {sorted(_ports(egress) - allowed_egress[component])} "
                f"beyond {sorted(allowed_egress[component])}"
            )
        ingress = [r for p in _policies_for(docs, labels, "Ingress") for r in p.get("ingress", [])]
        if _rules_without_ports(ingress):
            problems.append(f"{name}: an ingress rule without ports opens every port")
        own = {p["containerPort"] for c in containers(d) for p in c.get("ports", [])}
        if _ports(ingress) - own:
            problems.append(
                f"{name}: ingress allowed to ports {sorted(_ports(ingress) - own)} it does not serve"
            )
        if component == "connector" and not ingress:
            problems.append(f"{name}: a listener nobody may reach")
        if component == "worker" and ingress:
            problems.append(f"{name}: workers take no inbound connections")
    return problems


def triton_container(docs: list[Doc]) -> Doc | None:
    d = by_name(docs, "Deployment").get("radtriage-triton")
    return None if d is None else pod_spec(d)["containers"][0]


def server_flags(args: list[str]) -> dict[str, str]:
    """tritonserver's options as {name: value}, from `--name=value` or `--name value`."""
    flags: dict[str, str] = {}
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg[2:].partition("=")
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
        flags[name] = value
    return flags


def gpu_request(container: Doc) -> tuple[str | None, str | None]:
    """(requests, limits) of nvidia.com/gpu; an extended resource's request defaults to its limit."""
    res = container.get("resources", {})
    limit = res.get("limits", {}).get("nvidia.com/gpu")
    request = res.get("requests", {}).get("nvidia.com/gpu", limit)
    return (None if request is None else str(request), None if limit is None else str(limit))


def _probe_on(c: Doc, probe: str, path: str, port: int) -> bool:
    get = c.get(probe, {}).get("httpGet", {})
    ports = {p["name"]: p["containerPort"] for p in c["ports"] if "name" in p}
    return bool(get.get("path") == path and ports.get(get.get("port"), get.get("port")) == port)


def check_triton(docs: list[Doc]) -> list[str]:
    problems = []
    d = by_name(docs, "Deployment").get("radtriage-triton")
    if d is None:
        return ["no radtriage-triton Deployment"]
    spec = pod_spec(d)
    c = spec["containers"][0]
    # Triton 2.51 (what radtriage is verified with) is NGC's 24.10 release.
    if not re.fullmatch(r"nvcr\.io/nvidia/tritonserver:24\.10-py3", c["image"]):
        problems.append(f"Triton image {c['image']}: expected nvcr.io/nvidia/tritonserver:24.10-py3")
    if gpu_request(c) != ("1", "1"):
        problems.append(f"Triton must request and limit nvidia.com/gpu: 1, has {gpu_request(c)}")
    flags = server_flags(c.get("command", [])[1:] + c.get("args", []))
    if flags.get("model-repository") != "/models":
        problems.append("Triton must run with --model-repository=/models")
    # Without it every model loads config.pbtxt (KIND_CPU) and the GPU idles:
    # check_model_repository makes sure each model has the file the name selects.
    if flags.get("model-config-name") != GPU_CONFIG_NAME:
        problems.append(f"Triton must run with --model-config-name={GPU_CONFIG_NAME} (the KIND_GPU configs)")
    if not spec.get("nodeSelector"):
        problems.append("Triton needs a nodeSelector for GPU nodes (OPERATIONS.md, Install)")
    if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])):
        problems.append("Triton must tolerate the nvidia.com/gpu taint of GPU nodes")
    if not _probe_on(c, "readinessProbe", "/v2/health/ready", 8000):
        problems.append("Triton readiness must be /v2/health/ready on 8000")
    if not _probe_on(c, "livenessProbe", "/v2/health/live", 8000):
        problems.append("Triton liveness must be /v2/health/live on 8000")
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/models"]
    if not mounts:
        problems.append("Triton must mount the model repository at /models")
    for m in mounts:
        volume: Doc = next((v for v in spec.get("volumes", []) if v["name"] == m["name"]), {})
        claim = volume.get("persistentVolumeClaim")
        if m.get("readOnly") is not True or (claim is not None and claim.get("readOnly") is not True):
            problems.append("Triton must mount the model repository read-only (mount and claim)")
        if claim is not None and claim["claimName"] not in by_name(docs, "PersistentVolumeClaim"):
            problems.append(f"Triton's model repository claim {claim['claimName']} does not exist")
    svc = by_name(docs, "Service").get("radtriage-triton")
    if svc is None or {p["port"] for p in svc["spec"]["ports"]} != {8000, 8001, 8002}:
        problems.append("the Triton Service must expose 8000, 8001 and 8002")
    return problems


# ---------------------------------------------------------------- the model repository

MODEL_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
# models/serving.py's GPU_CONFIG_NAME (not imported: that module imports torch).
GPU_CONFIG_NAME = "gpu"


def model_dirs(repository: Path) -> list[Path]:
    return sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_model_repository(docs: list[Doc], repository: Path = MODEL_REPOSITORY) -> list[str]:
    """Every model has the custom config --model-config-name selects, and it is KIND_GPU.

    Triton falls back to config.pbtxt, without a word in its log, for a model without
    configs/<name>.pbtxt: that model would run KIND_CPU on the GPU pod."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    c = triton_container(docs)
    flags = server_flags([] if c is None else c.get("command", [])[1:] + c.get("args", []))
    name = flags.get("model-config-name", GPU_CONFIG_NAME)
    problems = []
    models = model_dirs(repository)
    if not models:
        problems.append(f"no models in {repository}")
    for model in models:
        path = model / "configs" / f"{name}.pbtxt"
        where = path.relative_to(repository)
        if not (model / "config.pbtxt").is_file():
            problems.append(f"{model.name}: no config.pbtxt (the default, KIND_CPU variant)")
        if not path.is_file():
            problems.append(
                f"{model.name}: no {where}: with --model-config-name={name} Triton would silently "
                "load config.pbtxt (KIND_CPU) on the GPU pod; write it with the model's training "
                "script (models/serving.py)"
            )
            continue
        try:
            config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        except text_format.ParseError as exc:
            problems.append(f"{where}: not a Triton ModelConfig: {exc}")
            continue
        if config.name and config.name != model.name:
            problems.append(f"{where}: names the model {config.name!r}, its directory is {model.name!r}")
        kinds = [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group]
        if not kinds or set(kinds) != {"KIND_GPU"}:
            problems.append(f"{where}: instance_group kinds {kinds}, the GPU variant must be KIND_GPU")
    return problems


# ---------------------------------------------------------------- the CPU-only component

CPU_ONLY = K8S / "components" / "cpu-only"
# Read by the models' model.py (torch threads), not a radtriage setting.
MODEL_ENV = {"RADTRIAGE_TORCH_THREADS"}


def _pointer(path: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]


def json_patch(doc: Doc, ops: list[Doc]) -> None:
    """RFC 6902 add/remove/replace/test, in place: what kustomize does with these patches."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        key: Any = last if isinstance(node, dict) else (len(node) if last == "-" else int(last))
        kind = op["op"]
        if kind == "test":
            if node[key] != op["value"]:
                raise ValueError(f"test {op['path']}: {node[key]!r} is not {op['value']!r}")
        elif kind == "remove":
            del node[key]
        elif kind == "replace":
            node[key] = op["value"]
        elif kind == "add" and isinstance(node, list):
            node.insert(key, op["value"])
        elif kind == "add":
            node[key] = op["value"]
        else:
            raise ValueError(f"unsupported patch op {kind}")


def with_component(docs: list[Doc], component: Path) -> list[Doc]:
    k = yaml.safe_load((component / "kustomization.yaml").read_text())
    assert k["kind"] == "Component" and set(k) <= {"apiVersion", "kind", "patches"}, "only JSON patches"
    for patch in k["patches"]:
        t = patch["target"]
        targets = [d for d in docs if d["kind"] == t["kind"] and d["metadata"]["name"] == t["name"]]
        assert len(targets) == 1, f"patch target {t} matches {len(targets)} documents"
        json_patch(targets[0], yaml.safe_load(patch["patch"]))
    return docs


def check_triton_cpu_only(docs: list[Doc]) -> list[str]:
    """The CPU-only variant: no GPU asked for anywhere, and the CPU configs served."""
    c = triton_container(docs)
    if c is None:
        return ["no radtriage-triton Deployment"]
    spec = pod_spec(by_name(docs, "Deployment")["radtriage-triton"])
    problems = []
    if gpu_request(c) != (None, None):
        problems.append("CPU-only Triton still requests nvidia.com/gpu")
    if "model-config-name" in server_flags(c.get("args", [])):
        problems.append("CPU-only Triton must load config.pbtxt: KIND_GPU configs fail without a GPU")
    if spec.get("nodeSelector") or spec.get("tolerations"):
        problems.append("CPU-only Triton still selects GPU nodes")
    return problems


ALL_CHECKS = (
    "check_metadata",
    "check_kafka_cluster",
    "check_services",
    "check_probes",
    "check_pdbs",
    "check_deployments",
    "check_commands",
    "check_routing_rules_copy",
    "check_no_secret_values",
    "check_network_policies",
    "check_triton",
    "check_model_repository",
)
CHECKS_WITH_SETTINGS = ("check_topics", "check_settings", "check_kafka_users", "check_scaling")


def every_problem(docs: list[Doc], settings: Settings) -> Iterator[str]:
    for name in ALL_CHECKS:
        yield from globals()[name](docs)
    for name in CHECKS_WITH_SETTINGS:
        yield from globals()[name](docs, settings)


# ---------------------------------------------------------------- the tests


@pytest.fixture
def docs() -> list[Doc]:
    return all_docs()


@pytest.fixture
def settings(docs: list[Doc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    return settings_from(docs, tmp_path, monkeypatch)


def test_every_manifest_file_is_in_the_kustomization() -> None:
    listed = {p.resolve() for p in manifest_files()}
    on_disk = {
        p.resolve()
        for p in K8S.rglob("*.yaml")
        if p.name != "kustomization.yaml" and not {"schemas", "components"} & set(p.relative_to(K8S).parts)
    }
    assert on_disk - listed == set(), "manifests not in kustomization.yaml"
    assert listed - on_disk == set(), "kustomization.yaml lists missing files"


def test_every_manifest_validates_against_its_schema(docs: list[Doc]) -> None:
    kinds = {d["kind"] for d in docs}
    assert CRD_KINDS <= kinds, f"expected the Strimzi and KEDA resources, missing {CRD_KINDS - kinds}"
    problems = [p for d in docs for p in schema_problems(d)]
    assert problems == []


@pytest.mark.parametrize("check", ALL_CHECKS)
def test_cross_references(check: str, docs: list[Doc]) -> None:
    assert globals()[check](docs) == []


@pytest.mark.parametrize("check", CHECKS_WITH_SETTINGS)
def test_cross_references_with_settings(check: str, docs: list[Doc], settings: Settings) -> None:
    assert globals()[check](docs, settings) == []


def test_the_configmap_loads_as_radtriage_settings(settings: Settings) -> None:
    assert not settings.kafka.embedded and settings.kafka.replication_factor == 3
    assert str(settings.home) == "/var/lib/radtriage"
    assert settings.streams.app_id == "radtriage"


# -- the validator rejects broken manifests (so a green run means something)


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    return by_name(docs, kind)[name]


def test_a_misspelt_core_field_is_rejected(docs: list[Doc]) -> None:
    dep = _one(docs, "Deployment", "radtriage-worker-stat")
    assert schema_problems(dep) == []
    dep["spec"]["template"]["spec"]["contianers"] = dep["spec"]["template"]["spec"].pop("containers")
    assert schema_problems(dep)
    svc = _one(docs, "Service", "radtriage-triton")
    svc["spec"]["ports"][0]["port"] = "eight thousand"
    assert schema_problems(svc)


def test_an_unknown_kind_is_not_waved_through(docs: list[Doc]) -> None:
    dep = _one(docs, "Deployment", "radtriage-http")
    dep["kind"] = "Deploymnet"
    assert any("no schema" in p for p in schema_problems(dep))


@pytest.mark.parametrize(
    ("kind", "name", "breakage"),
    [
        ("KafkaTopic", "triage.findings", lambda d: d["spec"].pop("partitions")),
        ("KafkaTopic", "triage.findings", lambda d: d["spec"].update(partitions="twelve")),
        ("KafkaTopic", "triage.findings", lambda d: d["metadata"]["labels"].clear()),
        ("KafkaNodePool", "broker", lambda d: d["spec"].update(roles=["leader"])),
        ("Kafka", CLUSTER, lambda d: d["spec"]["kafka"].update(replicas=3)),
        ("Kafka", CLUSTER, lambda d: d["metadata"]["annotations"].pop("strimzi.io/kraft")),
        (
            "KafkaUser",
            "radtriage-dicom",
            lambda d: d["spec"]["authorization"]["acls"][0].update(operation="Write"),
        ),
        ("ScaledObject", "radtriage-worker-stat", lambda d: d["spec"]["scaleTargetRef"].pop("name")),
        (
            "ScaledObject",
            "radtriage-worker-stat",
            lambda d: d["spec"]["triggers"][0]["metadata"].update(lagThreshold=2),
        ),
        (
            "ScaledObject",
            "radtriage-worker-stat",
            lambda d: d["spec"]["triggers"][0]["metadata"].update(topics="x"),
        ),
        (
            "TriggerAuthentication",
            "radtriage-keda-kafka",
            lambda d: d["spec"]["secretTargetRef"][0].pop("key"),
        ),
    ],
)
def test_a_broken_custom_resource_is_rejected(docs: list[Doc], kind: str, name: str, breakage: Any) -> None:
    doc = _one(docs, kind, name)
    assert schema_problems(doc) == []
    breakage(doc)
    assert schema_problems(doc)


def test_partition_drift_between_co_partitioned_topics_is_caught(docs: list[Doc], settings: Settings) -> None:
    _one(docs, "KafkaTopic", "triage.alerts.ich")["spec"]["partitions"] = 6
    assert any("co-partitioned" in p for p in check_topics(docs, settings))


def test_a_missing_topic_is_caught(docs: list[Doc], settings: Settings) -> None:
    docs.remove(_one(docs, "KafkaTopic", "radtriage-studies-by-accession"))
    assert any("radtriage-studies-by-accession" in p for p in check_topics(docs, settings))


def test_a_configmap_partition_count_unlike_the_topics_is_caught(docs: list[Doc], settings: Settings) -> None:
    settings.kafka.partitions = 3
    assert any("kafka.partitions" in p for p in check_topics(docs, settings))


def test_a_service_on_a_port_its_pods_do_not_serve_is_caught(docs: list[Doc]) -> None:
    _one(docs, "Service", "radtriage-hl7")["spec"]["ports"][0]["targetPort"] = "hl7"
    assert check_services(docs)


def test_a_pdb_selecting_nothing_is_caught(docs: list[Doc]) -> None:
    _one(docs, "PodDisruptionBudget", "radtriage-triton")["spec"]["selector"]["matchLabels"] = {
        "app.kubernetes.io/name": "triton"
    }
    assert len(check_pdbs(docs)) == 2  # the PDB selects nothing, and Triton has none


def test_a_connector_allowed_to_read_is_caught(docs: list[Doc], settings: Settings) -> None:
    acls = _one(docs, "KafkaUser", "radtriage-hl7")["spec"]["authorization"]["acls"]
    acls.append(
        {
            "resource": {"type": "topic", "name": "triage.findings", "patternType": "literal"},
            "operations": ["Read"],
        }
    )
    assert any("connectors may only" in p for p in check_kafka_users(docs, settings))


def test_a_misspelt_setting_is_caught(docs: list[Doc], settings: Settings) -> None:
    cm = _one(docs, "ConfigMap", "radtriage-config")
    config = yaml.safe_load(cm["data"]["radtriage.yaml"])
    config["kafka"]["bootstrap_server"] = config["kafka"].pop("bootstrap_servers")
    cm["data"]["radtriage.yaml"] = yaml.safe_dump(config)
    assert any("bootstrap_server is no setting" in p for p in check_settings(docs, settings))


def test_worker_egress_beyond_kafka_and_triton_is_caught(docs: list[Doc]) -> None:
    policy = _one(docs, "NetworkPolicy", "workers-egress-triton")
    policy["spec"]["egress"][0]["ports"].append({"protocol": "TCP", "port": 443})
    assert any("radtriage-worker-stat: egress" in p for p in check_network_policies(docs))


def test_more_workers_than_partitions_is_caught(docs: list[Doc], settings: Settings) -> None:
    _one(docs, "ScaledObject", "radtriage-worker-routine")["spec"]["maxReplicaCount"] = 10
    assert any("idle" in p for p in check_scaling(docs, settings))


# -- Triton on the GPU, and the CPU-only component


def _triton(docs: list[Doc]) -> Doc:
    c = triton_container(docs)
    assert c is not None
    return c


def _drop_arg(docs: list[Doc], prefix: str) -> None:
    c = _triton(docs)
    c["args"] = [a for a in c["args"] if not a.startswith(prefix)]


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda docs: _drop_arg(docs, "--model-config-name"), "--model-config-name=gpu"),
        (lambda docs: _triton(docs)["args"].append("--model-config-name=h100"), "--model-config-name=gpu"),
        (lambda docs: _drop_arg(docs, "--model-repository"), "--model-repository=/models"),
        (lambda docs: _triton(docs)["resources"]["limits"].pop("nvidia.com/gpu"), "nvidia.com/gpu"),
        (lambda docs: _triton(docs)["resources"]["requests"].update({"nvidia.com/gpu": 2}), "nvidia.com/gpu"),
        (
            lambda docs: pod_spec(_one(docs, "Deployment", "radtriage-triton")).pop("nodeSelector"),
            "nodeSelector",
        ),
        (lambda docs: pod_spec(_one(docs, "Deployment", "radtriage-triton")).pop("tolerations"), "taint"),
        (lambda docs: _triton(docs)["livenessProbe"]["httpGet"].update(path="/v2/health/ready"), "liveness"),
        (lambda docs: _triton(docs)["readinessProbe"]["httpGet"].update(port="metrics"), "readiness"),
        (lambda docs: _triton(docs)["volumeMounts"][0].update(readOnly=False), "read-only"),
        (
            lambda docs: pod_spec(_one(docs, "Deployment", "radtriage-triton"))["volumes"][0][
                "persistentVolumeClaim"
            ].pop("readOnly"),
            "read-only",
        ),
    ],
)
def test_a_triton_deployment_off_the_gpu_is_caught(docs: list[Doc], breakage: Any, expected: str) -> None:
    assert check_triton(docs) == []
    breakage(docs)
    assert any(expected in p for p in check_triton(docs)), check_triton(docs)


def test_the_config_name_flag_is_read_in_both_spellings() -> None:
    assert server_flags(["--model-config-name", "gpu", "--strict-readiness=true"]) == {
        "model-config-name": "gpu",
        "strict-readiness": "true",
    }
    assert server_flags(["--model-config-name=gpu"]) == {"model-config-name": "gpu"}


@pytest.fixture
def repository_copy(tmp_path: Path) -> Path:
    """The model repository's config files (not the weights), to break."""
    out = tmp_path / "model_repository"
    for model in model_dirs(MODEL_REPOSITORY):
        for config in [model / "config.pbtxt", *sorted((model / "configs").glob("*.pbtxt"))]:
            if config.is_file():
                target = out / config.relative_to(MODEL_REPOSITORY)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(config, target)
    return out


def _gpu_configs(repository: Path) -> list[Path]:
    return sorted(repository.glob(f"*/configs/{GPU_CONFIG_NAME}.pbtxt"))


def test_a_model_without_its_gpu_config_is_caught(docs: list[Doc], repository_copy: Path) -> None:
    victim = _gpu_configs(repository_copy)[0]
    victim.unlink()
    assert any(
        f"{victim.parent.parent.name}: no" in p and "silently" in p
        for p in check_model_repository(docs, repository_copy)
    )


def test_a_gpu_config_that_is_not_on_the_gpu_is_caught(docs: list[Doc], repository_copy: Path) -> None:
    victim = _gpu_configs(repository_copy)[0]
    victim.write_text(victim.read_text().replace("KIND_GPU", "KIND_CPU"))
    assert any("must be KIND_GPU" in p for p in check_model_repository(docs, repository_copy))


def test_a_gpu_config_triton_cannot_parse_is_caught(docs: list[Doc], repository_copy: Path) -> None:
    victim = _gpu_configs(repository_copy)[0]
    victim.write_text(victim.read_text().replace("instance_group", "instance_groups"))
    assert any("not a Triton ModelConfig" in p for p in check_model_repository(docs, repository_copy))


def test_the_config_name_checked_is_the_one_triton_is_given(docs: list[Doc], repository_copy: Path) -> None:
    c = _triton(docs)
    c["args"] = [a.replace("--model-config-name=gpu", "--model-config-name=h100") for a in c["args"]]
    problems = check_model_repository(docs, repository_copy)
    assert len(problems) == len(model_dirs(repository_copy))
    assert all("configs/h100.pbtxt" in p for p in problems)


@pytest.fixture
def cpu_docs() -> list[Doc]:
    return with_component(all_docs(), CPU_ONLY)


def test_the_cpu_only_component_takes_the_gpu_away_and_nothing_else(cpu_docs: list[Doc]) -> None:
    base = all_docs()
    assert [p for d in cpu_docs for p in schema_problems(d)] == []
    assert check_triton_cpu_only(cpu_docs) == []
    assert check_triton_cpu_only(base) != []  # the check sees the GPU settings of the base
    changed = [b["metadata"]["name"] for b, c in zip(base, cpu_docs, strict=True) if b != c]
    assert changed == ["radtriage-triton"]
    args = [a for a in _triton(base)["args"] if not a.startswith("--model-config-name")]
    assert _triton(cpu_docs)["args"] == args


@pytest.mark.parametrize(
    "check", [c for c in ALL_CHECKS if c not in {"check_triton", "check_model_repository"}]
)
def test_the_cpu_only_component_passes_the_other_checks(check: str, cpu_docs: list[Doc]) -> None:
    assert globals()[check](cpu_docs) == []


@pytest.mark.parametrize("check", CHECKS_WITH_SETTINGS)
def test_the_cpu_only_component_passes_the_checks_with_settings(
    check: str, cpu_docs: list[Doc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert globals()[check](cpu_docs, settings_from(cpu_docs, tmp_path, monkeypatch)) == []


def test_the_cpu_only_component_refuses_a_reordered_base() -> None:
    docs = all_docs()
    c = _triton(docs)
    c["args"].insert(1, c["args"].pop(c["args"].index("--model-config-name=gpu")) + "x")
    with pytest.raises(ValueError, match="test /spec/template/spec/containers/0/args/1"):
        with_component(docs, CPU_ONLY)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders_the_cpu_only_component_as_this_test_does(
    cpu_docs: list[Doc], tmp_path: Path
) -> None:
    """kubectl's own kustomize on a site overlay, as OPERATIONS.md tells an operator to write it."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S, tmp_path)],
                "components": [os.path.relpath(CPU_ONLY, tmp_path)],
            }
        )
    )
    out = subprocess.run(
        ["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in cpu_docs}
    assert rendered.keys() == ours.keys()
    assert rendered[("Deployment", "radtriage-triton")] == ours[("Deployment", "radtriage-triton")]
