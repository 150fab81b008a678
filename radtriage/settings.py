"""One typed settings object for every radtriage process.

Sources, highest priority first: explicit keyword arguments (the CLI's flags),
environment variables (``RADTRIAGE_`` prefix, ``__`` for nesting, e.g.
``RADTRIAGE_KAFKA__BOOTSTRAP_SERVERS``), a YAML file (``RADTRIAGE_CONFIG`` or
``./radtriage.yaml``), then the defaults below, which are the external contract of
ARCHITECTURE.md. Child processes started by ``radtriage up`` receive the resolved
settings as ``RADTRIAGE_SETTINGS_JSON`` so that every component sees one picture.
"""

from __future__ import annotations

import ipaddress
import os
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    SecretStr,
    SerializationInfo,
    Tag,
    field_serializer,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from models import registry

# Where the radtriage packages are imported from: a checkout's root, or the site-packages of
# an installed wheel (`up` runs its children there; Triton's Python backend imports the
# models from there). Never where data is found: that is `Settings.data_dir`. Tests and the
# development tools (training, export) use it as the checkout.
REPO_ROOT = Path(__file__).resolve().parent.parent
# Under `Settings.data_dir`: what the running product reads (setup.py ships these in the wheel).
ROUTING_RULES = Path("routing", "rules.yaml")
MODEL_REPOSITORY = Path("triton", "model_repository")
KAFKA_POM = Path("kafka", "pom.xml")
PYTHON_BACKEND = Path("triton", "python_backend", "model.py")


def default_data_dir() -> Path:
    """The default `Settings.data_dir`: the copy of deploy/ an installed wheel carries as
    package data (radtriage/deploy, put there by setup.py at build time), else, in a
    checkout (or an editable install), deploy/ itself."""
    packaged = resources.files("radtriage") / "deploy"
    if packaged.is_dir():
        # A wheel is installed as plain files: the resource is a real directory.
        return Path(str(packaged))
    return REPO_ROOT / "deploy"


SETTINGS_JSON_ENV = "RADTRIAGE_SETTINGS_JSON"
# Serialization context under which secrets are written out in clear (the settings that
# `radtriage up` hands its children); every other dump masks them.
REVEAL_SECRETS = "reveal_secrets"


# The priority lanes, fastest first: one request topic, preprocessing pool and Triton
# priority each (docs/ARCHITECTURE.md). Defined here only; everything else names these.
Lane = Literal["stat", "urgent", "routine"]
LANES: tuple[Lane, ...] = get_args(Lane)


def reveals_secrets(info: SerializationInfo) -> bool:
    """Secrets are masked in every dump except the one `up` hands its children
    (`Settings.inheritable_json`): they need the real values."""
    context = info.context
    return isinstance(context, dict) and bool(context.get(REVEAL_SECRETS))


def _dump_secret(value: SecretStr, info: SerializationInfo) -> str:
    return value.get_secret_value() if reveals_secrets(info) else str(value)


# A secret setting (a password, a key, a token): masked in every JSON dump but the one a
# child of `up` is given (reveals_secrets). One declaration, so no settings class can
# forget the rule.
Secret = Annotated[SecretStr, PlainSerializer(_dump_secret, when_used="json")]


def _default_home() -> Path:
    return Path(os.environ.get("RADTRIAGE_HOME", Path.home() / ".local" / "share" / "radtriage"))


def _default_cache() -> Path:
    return Path(os.environ.get("RADTRIAGE_CACHE", Path.home() / ".cache" / "radtriage"))


class Topics(BaseModel):
    instances: str = "imaging.instances"
    studies: str = "imaging.studies"
    orders: str = "imaging.orders"
    # ADT patient-location updates, keyed by patient id (the order-study join reads them).
    encounters: str = "imaging.encounters"
    requests_stat: str = "triage.requests.stat"
    requests_urgent: str = "triage.requests.urgent"
    requests_routine: str = "triage.requests.routine"
    findings: str = "triage.findings"
    results_fhir: str = "triage.results.fhir"
    # One alert topic per alert channel a model's spec names (models/<name>/spec.py):
    # triage.alerts.ich, triage.alerts.stroke, ...
    alerts_prefix: str = "triage.alerts."
    audit: str = "triage.audit"
    deadletter: str = "triage.deadletter"

    def lane_topic(self, lane: str) -> str:
        return {
            "stat": self.requests_stat,
            "urgent": self.requests_urgent,
            "routine": self.requests_routine,
        }[lane]

    def alert_topic(self, channel: str) -> str:
        return self.alerts_prefix + channel

    def alert_topics(self) -> list[str]:
        """Every registered model's alert topic (models/registry.py), sorted by channel."""
        return [self.alert_topic(c) for c in registry.alert_channels()]

    def all(self) -> list[str]:
        return [v for k, v in self.model_dump().items() if k != "alerts_prefix"] + self.alert_topics()


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:9092"
    # `radtriage up` starts a local single-node broker unless pointed elsewhere.
    embedded: bool = True
    embedded_version: str = "3.9.1"
    controller_port: int = 9093
    # `radtriage up --cluster 3`: that many local brokers (node i on bootstrap port + 2i and
    # controller_port + 2i), replication min(3, n), min.insync.replicas one less.
    embedded_nodes: int = Field(default=1, ge=1, le=9)
    partitions: int = 3
    replication_factor: int = 1
    # Topic config min.insync.replicas of the topics radtriage creates: with acks=all a write
    # succeeds while this many replicas have it (a 3-broker cluster: RF 3, 2 in sync).
    min_insync_replicas: int = 1
    # How long a connector waits for acks=all before it answers the sender with a failure.
    produce_timeout_s: float = 15.0
    # Security (docs/SECURITY.md, "Kafka security"); the defaults are the local plaintext broker.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    sasl_username: str = ""
    # The password itself, or a file holding it (a mounted Secret); the file wins when both are set.
    sasl_password: Secret = SecretStr("")
    sasl_password_file: Path | None = None
    # PEM files: the CA that signed the brokers' certificates, and an optional client
    # certificate + unencrypted key (mutual TLS).
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def password(self) -> str:
        """The SASL password: from sasl_password_file if set, else sasl_password."""
        if self.sasl_password_file is not None:
            try:
                return self.sasl_password_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"kafka.sasl_password_file {self.sasl_password_file}: {exc}") from exc
        return self.sasl_password.get_secret_value()


class TritonSettings(BaseModel):
    grpc_url: str = "127.0.0.1:8001"
    http_url: str = "127.0.0.1:8000"
    metrics_port: int = 8002
    embedded: bool = True
    # Default: under Settings.data_dir (which moves it when set).
    model_repository: Path = Field(default_factory=lambda: default_data_dir() / MODEL_REPOSITORY)
    timeout_s: float = 20.0
    # Triton priority levels (1 is highest) per lane; the model config declares 3 levels.
    lane_priority: dict[str, int] = Field(default_factory=lambda: {"stat": 1, "urgent": 2, "routine": 3})
    # Triton's own access control (--grpc-restricted-protocol / --http-restricted-api): when
    # a key is set, every API but health (server and model liveness/readiness: probes)
    # answers only requests carrying `api_key_header: <key>` (over gRPC Triton expects the
    # metadata key `triton-grpc-protocol-<api_key_header>`). The embedded Triton is started that way and every
    # radtriage client sends it. Triton's metrics port has no such control: keep it on
    # loopback or behind a NetworkPolicy (deploy/k8s does).
    api_key: Secret | None = None
    api_key_file: Path | None = None
    api_key_header: str = "radtriage-triton-key"

    @model_validator(mode="after")
    def _one_key_source(self) -> TritonSettings:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set triton.api_key or triton.api_key_file, not both")
        return self

    def auth_headers(self) -> dict[str, str]:
        """The header every Triton request carries (empty when no key is configured)."""
        if self.api_key is not None:
            key = self.api_key.get_secret_value()
        elif self.api_key_file is not None:
            # One line; the newline an editor or `echo` adds is not part of it.
            key = self.api_key_file.read_text().strip()
        else:
            return {}
        if not key:
            raise ValueError("triton.api_key(_file) is empty")
        return {self.api_key_header: key}

    def grpc_auth_headers(self) -> dict[str, str]:
        """`auth_headers` as the gRPC metadata Triton's restricted protocols look for."""
        return {f"triton-grpc-protocol-{k}": v for k, v in self.auth_headers().items()}


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(value: object) -> IpNetwork:
    """An allow-list entry: an IP address (one host) or a CIDR block, as the operator wrote it.

    A block with host bits set (`10.1.2.5/24`) is refused rather than silently widened or
    narrowed: in an allow-list either reading may be the typo."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    text = str(value).strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or CIDR block ({exc})") from None
        raise ValueError(f"{text!r} has host bits set: did you mean {loose}?") from None


AllowedNetwork = Annotated[IpNetwork, BeforeValidator(parse_network)]


class TlsSettings(BaseModel):
    """Server-side TLS of one listener; radtriage/tls.py builds the ssl.SSLContext (TLS 1.2+).

    Off by default. With `client_ca_file` every client must present a certificate signed by
    that CA (mutual TLS); without it any client may connect and only the server is proven."""

    enabled: bool = False
    cert_file: Path | None = None  # PEM: the server certificate, then any intermediates
    key_file: Path | None = None  # PEM private key
    # Only for an encrypted key file: the password itself, or a file holding it (a mounted
    # secret). Never logged.
    key_password: Secret | None = None
    key_password_file: Path | None = None
    client_ca_file: Path | None = None
    # A connection that has not finished its handshake by then is closed.
    handshake_timeout_s: float = 10.0

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("TLS is enabled but cert_file and key_file are not both set")
        if self.key_password is not None and self.key_password_file is not None:
            raise ValueError("set key_password or key_password_file, not both")
        return self


def _check_ae_title(value: str) -> str:
    """PS3.5 AE (VR AE): 1-16 characters, no backslash or control characters; spaces
    at either end are not significant."""
    title = value.strip()
    if not 1 <= len(title) <= 16 or any(c == "\\" or not (" " <= c <= "~") for c in title):
        raise ValueError(f"{value!r} is not a DICOM AE title (1-16 printable ASCII characters, no backslash)")
    return title


AeTitle = Annotated[str, AfterValidator(_check_ae_title)]


class DicomCaller(BaseModel):
    """One allowed caller: its calling AE title and the source addresses it may call from."""

    ae_title: AeTitle
    # IP addresses or CIDR blocks; at least one (a caller allowed from anywhere says
    # 0.0.0.0/0 and ::/0 explicitly).
    hosts: list[AllowedNetwork] = Field(min_length=1)


class DicomSettings(BaseModel):
    port: int = 11112
    ae_title: AeTitle = "RADTRIAGE"
    bind_address: str = "0.0.0.0"
    # Largest single object accepted; a CT slice is ~0.5 MB, an enhanced multiframe far more.
    max_pdu: int = 16382
    # Who may associate (connectors/dicom/callers.py). Empty: anyone (the local default).
    # Otherwise an association whose calling AE title is not listed, or comes from an
    # address not listed for that title, is rejected (A-ASSOCIATE-RJ, rejected-permanent,
    # service-user, "calling AE title not recognised").
    allowed_callers: list[DicomCaller] = Field(default_factory=list)
    # Reject an association whose called AE title is not `ae_title` ("called AE title not
    # recognised"). None: on exactly when `allowed_callers` is set.
    require_called_ae_title: bool | None = None
    # The unencrypted listener on `port`; false once every sender uses TLS.
    plain_enabled: bool = True
    # DICOM over TLS (PS3.15 B.1) is a second listener on its own port (2762 is the
    # well-known DICOM-TLS port), so senders move to it one at a time.
    tls: TlsSettings = Field(default_factory=TlsSettings)
    tls_port: int = 2762

    @model_validator(mode="after")
    def _some_listener(self) -> DicomSettings:
        if not self.plain_enabled and not self.tls.enabled:
            raise ValueError(
                "dicom.plain_enabled is false and dicom.tls is not enabled: nothing would listen"
            )
        return self

    @property
    def main_port(self) -> int:
        """The port a readiness or status probe connects to: the plain one unless it is off."""
        return self.port if self.plain_enabled else self.tls_port

    @property
    def called_ae_title_required(self) -> bool:
        if self.require_called_ae_title is None:
            return bool(self.allowed_callers)
        return self.require_called_ae_title


class DestinationTls(BaseModel):
    """DICOM over TLS (PS3.15 B.1) to a PACS: its certificate is verified against `ca_file`
    and its name or address (`host`); `cert_file` + `key_file` (PEM, unencrypted key) are
    radtriage's own certificate when the PACS asks for one (mutual TLS)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> DestinationTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file are given together or not at all")
        return self


# The result objects a destination may take: the TID 1500 SR (processors/dicom_results.py),
# for positive findings a secondary-capture key image and the KOS that flags it
# (processors/key_images.py), and for positive findings a model localises (the ICH map,
# lung nodules) a DICOM SEG (processors/dicom_seg.py). Sent in this order: a KOS after
# the image it references.
ResultObject = Literal["sr", "key_image", "kos", "seg"]
RESULT_OBJECTS: tuple[ResultObject, ...] = get_args(ResultObject)


class _Destination(BaseModel):
    """What every destination has: its name and its rules (which objects, which findings)."""

    # A field of the other kind (a `host` on a STOW destination) is a mistake to say, not
    # to drop silently.
    model_config = ConfigDict(extra="forbid")

    # Names the destination in the audit trail, the dead letters and the metrics.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # Which objects (RESULT_OBJECTS).
    objects: list[ResultObject] = Field(default_factory=lambda: list[ResultObject](["sr"]), min_length=1)
    # Which findings (codes of registered models, e.g. ICH, LVO); empty: every finding.
    findings: list[str] = Field(default_factory=list)
    # Only positive findings (a negative finding's SR says "absent": some sites want it).
    positive_only: bool = False

    @model_validator(mode="after")
    def _known_findings(self) -> _Destination:
        unknown = sorted(set(self.findings) - set(registry.finding_codes()))
        if unknown:
            known = ", ".join(sorted(registry.finding_codes()))
            raise ValueError(f"destination {self.name}: unknown finding(s) {unknown} (known: {known})")
        if "kos" in self.objects and "key_image" not in self.objects:
            raise ValueError(
                f"destination {self.name}: objects has kos without key_image "
                "(the KOS references the key image)"
            )
        return self

    def wants(self, finding: str, positive: bool) -> bool:
        """Whether a finding of this code and sign goes to this destination."""
        return (not self.findings or finding in self.findings) and (positive or not self.positive_only)


class DicomDestination(_Destination):
    """One PACS the pacs-export stage sends results to by C-STORE (docs/INTEGRATION.md,
    "Results to the PACS")."""

    kind: Literal["dicom"] = "dicom"
    host: str = Field(min_length=1)
    port: int = Field(default=104, ge=1, le=65535)
    # The PACS's AE title (called) and the one radtriage calls from (what the PACS's list
    # of known modalities must name).
    ae_title: AeTitle
    calling_ae_title: AeTitle = "RADTRIAGE"
    # DICOM over TLS (the PACS's TLS port, often 2762); None: plain TCP.
    tls: DestinationTls | None = None

    @property
    def where(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class StowDestination(_Destination):
    """One DICOMweb service the pacs-export stage sends results to by STOW-RS (PS3.18
    10.5): `POST {url}/studies`, one object per request (streams/stow_send.py)."""

    kind: Literal["stow"]
    # The service's base URL (e.g. http://pacs:8042/dicom-web for Orthanc's plugin).
    url: str = Field(pattern=r"^https?://[^\s/]+(/\S*)?$")
    # Either a bearer token or HTTP basic (username + password); neither: no Authorization.
    bearer_token: Secret | None = None
    username: str | None = None
    password: Secret | None = None
    # HTTPS: the service's certificate is verified (against `ca_file`, else the system's
    # CAs) unless `tls_verify` is false (a test bench's self-signed peer only).
    tls_verify: bool = True
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _one_auth(self) -> StowDestination:
        if (self.username is None) != (self.password is None):
            raise ValueError(f"destination {self.name}: username and password are set together or not at all")
        if self.bearer_token is not None and self.username is not None:
            raise ValueError(f"destination {self.name}: bearer_token or username/password, not both")
        return self

    @property
    def where(self) -> str:
        return self.url


def _destination_kind(value: object) -> str:
    # `kind` may be left out for a C-STORE destination (what every earlier configuration says).
    kind = value.get("kind", "dicom") if isinstance(value, dict) else getattr(value, "kind", "dicom")
    return str(kind)


Destination = Annotated[
    Annotated[DicomDestination, Tag("dicom")] | Annotated[StowDestination, Tag("stow")],
    Discriminator(_destination_kind),
]


class DispatchSettings(BaseModel):
    """Results sent back to the PACS (streams/stages/pacs_export.py). No destination: nothing
    is sent. Env: RADTRIAGE_DISPATCH__DESTINATIONS='[{"name": ..., "host": ...}]'."""

    destinations: list[Destination] = Field(default_factory=list)
    # A destination that keeps failing (down, refusing with Out of Resources) is retried
    # with exponential backoff from retry_initial_s up to retry_max_s between tries, until
    # retry_deadline_s after the first try; then the finding is dead-lettered for replay.
    retry_initial_s: float = Field(default=1.0, gt=0.0)
    retry_max_s: float = Field(default=30.0, gt=0.0)
    retry_deadline_s: float = Field(default=600.0, gt=0.0)
    # ACSE, DIMSE and network timeouts of one association.
    timeout_s: float = Field(default=30.0, gt=0.0)
    # How long the export waits for a finding's localisation map (the infer stage writes it
    # just after publishing the finding, and again when a kill came between the two); then
    # the SEG goes without it (`seg_map_missing` on triage.audit).
    map_wait_s: float = Field(default=30.0, ge=0.0)
    # Where the SR, key image, KOS and SEG are built: a thread of the worker, or a process of
    # their own (at `build_niceness`). On the 2-core bench box the thread was faster for
    # the alert's other deliveries too: the process's build took the core they needed
    # (bench/RESULTS.md, "Result objects in a process"). A box with cores to spare keeps
    # the build's GIL time off the worker's event loop with "process".
    build_in: Literal["thread", "process"] = "thread"
    build_niceness: int = Field(default=10, ge=0, le=19)

    @model_validator(mode="after")
    def _unique_names(self) -> DispatchSettings:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"dispatch.destinations: duplicate name(s) {duplicates}")
        return self

    def wants_object(self, what: ResultObject) -> bool:
        """Whether some destination asks for `what` (e.g. the infer stage keeps a finding's
        localisation map only when a destination wants its SEG)."""
        return any(what in d.objects for d in self.destinations)


# The delivery stages that read an outbox topic of their own (streams/stages/outbox.py).
OUTBOX_STAGES = ("pacs-export", "ehr-hl7")


class StreamSettings(BaseModel):
    app_id: str = "radtriage"
    # A study with no association-release marker is ready after this much silence.
    assembly_quiet_s: float = 10.0
    assembly_scan_interval_s: float = 1.0
    # When a release marker counts more instances than the assembly holds, the log is read
    # back from the association's start less this margin (the connector's clock stamped the
    # start, the broker may stamp records), at most this many records.
    assembly_reread_margin_s: float = Field(default=5.0, ge=0)
    assembly_reread_max_records: int = Field(default=200_000, gt=0)
    assembly_reread_timeout_s: float = Field(default=30.0, gt=0)
    # A killed worker's partitions move to the survivors after this long without heartbeats
    # (Faust's default is 60 s: far too long for a stat lane).
    session_timeout_s: float = 10.0
    heartbeat_interval_s: float = 3.0
    # Concurrency of each lane's inference agent; stat keeps its own capacity.
    lane_concurrency: dict[str, int] = Field(default_factory=lambda: {"stat": 2, "urgent": 1, "routine": 1})
    # Series loading + preprocessing runs in one process pool per lane; the urgent and
    # routine pools at a higher nice value so stat work gets the cores first.
    preprocess_niceness: dict[str, int] = Field(
        default_factory=lambda: {"stat": 0, "urgent": 5, "routine": 10}
    )
    # Working memory all lanes' preprocessing may hold at once (processors/preprocess_pool.py:
    # a request waits until its series' estimate fits; stat first). 4 GiB: a 2-core 24 GB box
    # runs ~10 scanner-sized head CTs in it beside Kafka and Triton; one larger than all of
    # it runs alone.
    preprocess_memory_budget_bytes: int = Field(default=4 * 1024**3, gt=0)
    # Names one of several workers sharing a home (its ready marker and log): scale-out
    # runs more workers in one consumer group, on one machine in the cluster test.
    instance_name: str = ""
    # How far back the findings and reports ledgers read their topics when a worker takes
    # over a partition (streams/published_ledger.py): a crash replays what was produced
    # moments before it, so hours are ample; the alert ledger always reads its topics whole.
    ledger_lookback_s: float = 6 * 3600.0
    # Fault tests only: kill the worker right after a finding, report or alert is acked by
    # Kafka and before anything else (offset commit, audit) happened.
    # crash_after_notify: right after a peer accepted a notification, before it is recorded.
    fault_injection: Literal[
        "", "crash_after_finding", "crash_after_report", "crash_after_alert", "crash_after_notify"
    ] = ""
    # A SIGTERMed worker that has not finished stopping after this long exits hard: a stop
    # stuck in a rebalance or a process pool must not outlive the pod's grace period
    # (60 s in deploy/k8s). Nothing is lost by it: offsets of unfinished work are not
    # committed, and the published ledgers keep the replay from publishing twice.
    shutdown_timeout_s: float = 20.0
    # After the warm-up, move every object alive then (the imported libraries: torch, MONAI,
    # pydicom, highdicom, fhir.resources) out of the garbage collector's reach (gc.freeze):
    # a full collection walked them all, 40-200 ms with the loop stopped, long enough to
    # hold up an alert's webhook by as much (bench/RESULTS.md, "Alerts first").
    gc_freeze_after_warm: bool = True
    # How long a thread running Python keeps the GIL while another waits for it (Python's
    # default 5 ms; 0 keeps it). The event loop thread gives the GIL up at every socket
    # call of a webhook POST or a Kafka fetch and, with a thread of the worker busy in
    # Python (the span exporter, a library's thread), waits up to this long to get it back
    # each time (bench/RESULTS.md, "The alert handed over as it is sent"; not measured
    # alone).
    gil_switch_interval_s: float = Field(default=0.001, ge=0.0, le=0.1)

    @property
    def studies_by_patient_topic(self) -> str:
        """Internal repartition topic: ready studies keyed by patient id (ADT location join)."""
        return f"{self.app_id}-studies-by-patient"

    @property
    def studies_by_accession_topic(self) -> str:
        """Internal repartition topic: ready studies keyed by accession number (order join)."""
        return f"{self.app_id}-studies-by-accession"

    @property
    def notify_retry_topic(self) -> str:
        """Where a replayed notify dead letter goes: the alert again, for the notify stage to
        try its undeliverable recipients once more (not the alert topic: its consumers would
        see a second alert)."""
        return f"{self.app_id}-notify-retry"

    def outbox_topic(self, stage: str) -> str:
        """The internal topic a delivery stage's slow agent reads (streams/stages/outbox.py):
        the findings its configuration wants, forwarded off `triage.findings` so a peer that
        is down holds only this topic's partitions, never the alert path's."""
        return f"{self.app_id}-{stage}-outbox"

    def internal_topics(self) -> list[str]:
        return [
            self.studies_by_patient_topic,
            self.studies_by_accession_topic,
            self.notify_retry_topic,
            *(self.outbox_topic(stage) for stage in OUTBOX_STAGES),
        ]


class Hl7Settings(BaseModel):
    port: int = 2575
    bind_address: str = "0.0.0.0"
    # A frame larger than this is refused (AR) and the connection closed: an order is a few KB.
    max_message_bytes: int = 1 << 20
    # A connection silent this long is closed; senders reconnect per message or batch.
    idle_timeout_s: float = 300.0
    # Source addresses allowed to connect (IP addresses or CIDR blocks). Empty: any (the
    # local default). A connection from elsewhere is closed before a byte is read.
    allowed_sources: list[AllowedNetwork] = Field(default_factory=list)
    # MLLP over TLS on `port` itself (HL7 has no separate well-known TLS port): when
    # enabled, the listener speaks TLS only.
    tls: TlsSettings = Field(default_factory=TlsSettings)


class ClientTlsSettings(BaseModel):
    """Client-side TLS of an outbound connection (radtriage/tls.py `client_context`): the
    peer's certificate is checked against `ca_file` (else the system's CAs) and its name;
    `cert_file`/`key_file` present ours when the peer asks (mutual TLS)."""

    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # The name the peer's certificate must carry; None: the host connected to.
    server_hostname: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> ClientTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file are set together or not at all")
        return self


class EhrHl7Settings(BaseModel):
    """Where results go as HL7 v2 ORU^R01 over MLLP (streams/stages/ehr_hl7.py)."""

    host: str
    port: int = Field(ge=1, le=65535)
    tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)
    # MSH-3 / MSH-4 (ours) and MSH-5 / MSH-6 (theirs): HD namespace ids (IS, 20 characters).
    sending_application: str = Field(default="RADTRIAGE", max_length=20)
    sending_facility: str = Field(default="RADTRIAGE", max_length=20)
    receiving_application: str = Field(default="", max_length=20)
    receiving_facility: str = Field(default="", max_length=20)
    # How long one attempt waits for the ACK, and how long a report is retried (with
    # backoff) before it is dead-lettered as undeliverable.
    ack_timeout_s: float = Field(default=10.0, gt=0)
    deadline_s: float = Field(default=600.0, gt=0)
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=30.0, gt=0)


class EhrFhirAuthSettings(BaseModel):
    """How radtriage identifies itself to the FHIR server: nothing, a bearer token, or HTTP
    basic (env: RADTRIAGE_EHR__FHIR='{"base_url": ..., "auth": {"bearer_token": "..."}}')."""

    bearer_token: Secret | None = None
    username: str = ""
    password: Secret | None = None

    @model_validator(mode="after")
    def _one(self) -> EhrFhirAuthSettings:
        if self.bearer_token is not None and self.username:
            raise ValueError("auth is a bearer_token or a username/password, not both")
        if bool(self.username) != (self.password is not None):
            raise ValueError("username and password are set together or not at all")
        return self


class EhrFhirSettings(BaseModel):
    """Where results go as FHIR transactions (streams/stages/ehr_fhir.py)."""

    # The server's base, e.g. https://ehr.example.org/fhir (the transaction is POSTed to it).
    base_url: str = Field(pattern=r"^https?://")
    auth: EhrFhirAuthSettings = Field(default_factory=EhrFhirAuthSettings)
    # https only: check the server's certificate (against ca_file, else the system's CAs).
    tls_verify: bool = True
    ca_file: Path | None = None
    # https only, for a server that wants a client certificate (mutual TLS): radtriage's
    # certificate (PEM, its chain after it) and its unencrypted key (omitted: in the
    # certificate's file). Loaded when the stage registers: unreadable, the worker stops.
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    # One attempt's limit, and how long a report is retried (with backoff) on 5xx, a
    # timeout or a refused connection before it is dead-lettered as undelivered.
    timeout_s: float = Field(default=30.0, gt=0)
    retry_deadline_s: float = Field(default=600.0, gt=0)
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _client_certificate(self) -> EhrFhirSettings:
        if self.client_key_file is not None and self.client_cert_file is None:
            raise ValueError("client_key_file needs client_cert_file")
        if self.client_cert_file is not None and not self.base_url.startswith("https://"):
            raise ValueError("a client certificate is sent only over https: base_url is http")
        return self


class EhrSettings(BaseModel):
    """Results to the EHR and RIS (docs/ARCHITECTURE.md "Results to the EHR")."""

    # The patient identifier's system in reports whose order did not say who assigned the
    # id (no FHIR identifier.system, no PID-3.4 universal id): set it to the site's MRN system.
    patient_id_system: str = "https://radtriage.dev/fhir/sid/patient-id"
    # None: no HL7 endpoint, nothing is sent (env RADTRIAGE_EHR__HL7 as JSON).
    hl7: EhrHl7Settings | None = None
    # None: no FHIR server, the ehr-fhir stage is not registered (env RADTRIAGE_EHR__FHIR as JSON).
    fhir: EhrFhirSettings | None = None


class HttpAuthSettings(BaseModel):
    """Who may use the HTTP port (connectors/http/auth.py). Off by default: the local stack."""

    # off: everyone; bearer: a token; mtls: a verified client certificate (needs tls.client_ca_file);
    # bearer_or_mtls: either.
    mode: Literal["off", "bearer", "mtls", "bearer_or_mtls"] = "off"
    # Accepted bearer tokens (env: RADTRIAGE_HTTP__AUTH__TOKENS='["t1","t2"]')...
    tokens: list[SecretStr] = Field(default_factory=list)
    # ...and/or a file of tokens, one per line, '#' comments: rotated by editing the file
    # (re-read when it changes; a broken edit keeps the previous tokens and is logged).
    tokens_file: Path | None = None
    # Paths served without credentials: exact, or a prefix when the entry ends with '/'.
    # /healthz carries no PHI and Kubernetes probes cannot send a token; /notify/ack checks
    # its own signed, expiring token (connectors/http/notify_ack.py).
    public_paths: list[str] = Field(default_factory=lambda: ["/healthz", "/notify/ack"])

    @field_serializer("tokens")
    def _dump_tokens(self, tokens: list[SecretStr], info: SerializationInfo) -> list[str]:
        return [t.get_secret_value() if reveals_secrets(info) else str(t) for t in tokens]


class HttpSettings(BaseModel):
    """FHIR intake (`/fhir`), DICOMweb STOW-RS (`/dicomweb/studies`), health (`/healthz`)."""

    port: int = 8080
    bind_address: str = "0.0.0.0"
    # Base URL written into Location headers; empty = derived from the request's Host.
    public_base_url: str = ""
    # A FHIR resource is small; a STOW-RS request may carry a whole series.
    max_fhir_bytes: int = 4 << 20
    max_stow_bytes: int = 2 << 30
    # HTTPS (connectors/http/tls.py); with auth.mode bearer_or_mtls a client certificate is
    # optional (a token will do), with mtls required.
    tls: TlsSettings = Field(default_factory=TlsSettings)
    auth: HttpAuthSettings = Field(default_factory=HttpAuthSettings)

    @property
    def scheme(self) -> str:
        return "https" if self.tls.enabled else "http"


class OrderSettings(BaseModel):
    """How orders and patient location set a study's lane (ARCHITECTURE.md, Priority)."""

    # Indications that make a study stat whatever the order's priority field says
    # (searched case-insensitively in the reason for study / clinical indication).
    stat_indications: list[str] = Field(
        default_factory=lambda: [
            r"\bcode[\s-]*stroke\b",
            r"\bstroke[\s-]*(alert|code|activation)\b",
            r"\bacute\s+stroke\b",
            r"\bcode[\s-]*trauma\b",
            r"\btrauma[\s-]*(alert|activation|code|team|call)\b",
            r"\b(major|level[\s-]*(1|i))\s+trauma\b",
        ]
    )
    # A study's requests are kept this long for a late order to upgrade their lane.
    join_retention_s: float = 24 * 3600.0


class TelemetrySettings(BaseModel):
    exporter: Literal["none", "console", "otlp", "jsonl"] = "jsonl"
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    # OTLP transport: HTTP/protobuf (port 4318, path /v1/traces) or gRPC (port 4317, no path);
    # collectors accept both, some networks let only one through.
    otlp_protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    service_name: str = "radtriage"
    # The jsonl file is rotated past this size (0 = never), keeping this many backups.
    jsonl_max_bytes: int = 256 << 20
    jsonl_backups: int = 3


class StatusSettings(BaseModel):
    """`radtriage status`: the operator's one-screen summary (radtriage/status.py)."""

    # Latency percentiles and in-flight counts cover the findings/requests of this window.
    window_s: float = 900.0
    # Every Kafka, Triton and port probe gives up after this long: DOWN, never a hang.
    probe_timeout_s: float = 2.0
    # `--watch` redraws this often.
    refresh_s: float = 2.0
    recent_alerts: int = 10


class MetricsSettings(BaseModel):
    """Prometheus metrics (radtriage/metrics.py). The HTTP process serves `/metrics` on its port."""

    # worker / dicom-scp / hl7-listener serve their own /metrics here when set (a pod per
    # process); 0 = off (one host: `radtriage up` aggregates every process on the HTTP port).
    port: int = 0
    bind_address: str = "0.0.0.0"
    # Consumer lag and model readiness are read at scrape time, cached this long...
    scrape_cache_s: float = 5.0
    # ...and each read gives up after this long (Kafka or Triton down: gauge absent / 0).
    probe_timeout_s: float = 2.0


class FhirSearchSettings(BaseModel):
    """FHIR read/search of the results on `/fhir` (connectors/fhir/results_view.py): an
    in-memory view of `topics.results_fhir`, rebuilt from the topic at every start."""

    enabled: bool = True
    # DiagnosticReports + Observations kept (≈10 KB each in memory, bench/RESULTS.md); past
    # it the oldest reports (with their Observations) are dropped and no longer found
    # (docs/ARCHITECTURE.md "FHIR read and search").
    max_resources: int = Field(default=40_000, ge=10)
    # Page size when a search gives no _count, and the largest _count honoured.
    default_count: int = Field(default=50, ge=1)
    max_count: int = Field(default=500, ge=1)
    # After a Kafka error the reader reconnects after this long (the view keeps serving).
    retry_s: float = Field(default=3.0, gt=0)


class OperatorSettings(BaseModel):
    """The live operator page at `/` on the HTTP port (radtriage/operator/)."""

    enabled: bool = True
    # How far back the page's own Kafka reader starts (by record timestamp), so a
    # restarted server shows the shift's alerts, acknowledgements and open work again.
    lookback_s: float = 12 * 3600.0
    # Bounds of the in-memory view: the oldest entries are dropped first.
    max_alerts: int = 200
    max_studies: int = 2000
    max_finished: int = 100
    max_deadletters: int = 200
    # Changes are pushed to open pages at most this often (coalesced), with an SSE
    # comment every heartbeat_s so proxies and the browser keep the stream open.
    push_interval_s: float = 0.3
    heartbeat_s: float = 15.0
    # While Kafka is unreachable the page says so and the reader retries this often.
    retry_s: float = 3.0
    # The waterfall reads at most this many bytes from the end of the trace file.
    trace_scan_bytes: int = 64 << 20


class WebhookTarget(BaseModel):
    """One incoming webhook the notify stage may post to (processors/notify/channels.py)."""

    # What the on-call file's `webhook:` channels call it; "" = `webhook<index>` in the list.
    name: str = ""
    url: str
    # HMAC-SHA256 key of the X-Radtriage-Signature header; "" = unsigned (Teams/Slack verify nothing).
    secret: Secret = SecretStr("")
    # Finding codes it carries (e.g. ["ICH"]); empty = every finding.
    findings: list[str] = Field(default_factory=list)
    format: Literal["json", "teams", "slack"] = "json"


class SmtpSettings(BaseModel):
    """The mail relay e-mail notifications go through; `host` "" = no e-mail."""

    host: str = ""
    port: int = 587
    # STARTTLS before anything is sent (refused if the server does not offer it).
    starttls: bool = True
    sender: str = Field(default="radtriage@localhost", validation_alias=AliasChoices("from", "sender"))
    username: str = ""
    password: Secret = SecretStr("")
    # The CA the relay's certificate is checked against; None = the system's store.
    cafile: Path | None = None
    timeout_s: float = 10.0
    # Kept connections to the relay (processors/notify/smtp_relay.py): at most this many
    # open at once, each closed and made again after `idle_s` unused.
    connections: int = Field(default=4, ge=1)
    idle_s: float = 30.0


# What a hospital may leave out of notifications (minimum necessary): a message always
# says the finding, the lane, the escalation step and the links, never a name or birth date.
NotifyOmittable = Literal["accession", "probability", "side", "slices", "location", "since_scan"]


def _stuck_after_defaults() -> dict[Lane, float]:
    return {"stat": 120.0, "urgent": 900.0, "routine": 3600.0}


class OperatorNotifySettings(BaseModel):
    """Operators told of dead letters and stuck studies, in digests (streams/stages/notify_ops.py;
    env e.g. RADTRIAGE_NOTIFY__OPERATORS__WEBHOOKS='["ops"]'). Nothing named: nothing sent."""

    # A recipient of the on-call file (its channels, in order), and/or channels named here:
    # webhooks of `notify.webhooks` by name, e-mail addresses (need `notify.smtp.host`).
    recipient: str = ""
    webhooks: list[str] = Field(default_factory=list)
    emails: list[str] = Field(default_factory=list)
    # Tell them of dead letters (any stage's, triage.deadletter).
    deadletters: bool = True
    # A request routed on a lane with no finding after this long is stuck; a lane left out
    # is not watched ({} = no stuck-study notifications).
    stuck_after_s: dict[Lane, float] = Field(default_factory=_stuck_after_defaults)
    # At most one message per cause per `digest_s` (a flood of dead letters is one digest
    # listing `examples` of them and the count), sent when the period ends.
    digest_s: float = Field(default=60.0, gt=0)
    examples: int = Field(default=5, ge=0)
    # Bounded memory: requests watched for a finding, causes held per period.
    max_watched: int = Field(default=20000, ge=1)
    max_causes: int = Field(default=100, ge=1)

    @property
    def configured(self) -> bool:
        return bool(self.recipient or self.webhooks or self.emails)


class NotifySettings(BaseModel):
    """Who hears of an alert, and how (streams/stages/notify.py; docs/OPERATIONS.md, Notification)."""

    webhooks: list[WebhookTarget] = Field(default_factory=list)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    # The on-call file (schemas/oncall.py); None: every webhook whose findings match gets
    # each alert once, with no escalation.
    oncall_file: Path | None = None
    # Key of the acknowledgement links' HMAC tokens; "" = messages carry no ack link.
    ack_secret: Secret = SecretStr("")
    # Base URL of the HTTP port as the recipients reach it (operator page, ack links).
    public_url: str = "http://127.0.0.1:8080"
    ack_ttl_s: float = 24 * 3600.0
    # Per channel: tries, the first pause between them (doubled each time), one try's limit.
    attempts: int = Field(default=3, ge=1)
    backoff_s: float = 0.5
    request_timeout_s: float = 5.0
    # How often the escalation timer looks for steps past their timeout.
    tick_s: float = 0.5
    # How far back a worker taking over a partition reads the notification record.
    lookback_s: float = 24 * 3600.0
    # An alert older than this when first read opens no escalation (`notify_skipped`,
    # reason too_old): notification turned on reads the alert topics from their start
    # (no agent read them while it was off), and must not page anyone for yesterday's alerts.
    max_alert_age_s: float = Field(default=3600.0, gt=0)
    # Alerts first (streams/alert_first.py): in a worker that notifies, the report, ORU and
    # result objects of a finding that alerts wait until its first step was told, at most
    # this long. 0: they never wait.
    alert_first_s: float = Field(default=0.5, ge=0)
    # An alert this worker's escalate stage writes to a partition its notify stage owns is
    # handed to that stage as it is sent, not after its round trip through Kafka
    # (streams/alert_first.py). False: the stream's read of it is the only way in.
    hand_over: bool = True
    # Left out of every message (env: RADTRIAGE_NOTIFY__OMIT='["accession"]').
    omit: list[NotifyOmittable] = Field(default_factory=list)
    operators: OperatorNotifySettings = Field(default_factory=OperatorNotifySettings)

    def named_webhooks(self) -> dict[str, WebhookTarget]:
        return {w.name or f"webhook{i}": w for i, w in enumerate(self.webhooks)}

    @property
    def configured(self) -> bool:
        """Anything to send to: a webhook, or an on-call file (whose e-mails need `smtp.host`)."""
        return bool(self.webhooks) or self.oncall_file is not None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RADTRIAGE_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    home: Path = Field(default_factory=_default_home)
    cache: Path = Field(default_factory=_default_cache)
    # The one root of everything radtriage reads that is data, not code (env
    # RADTRIAGE_DATA_DIR): deploy/ of a checkout, or its copy in an installed wheel
    # (`default_data_dir`). The routing rules and Triton's model repository default under it
    # (set either to move it alone); the local Kafka broker's POM is found there.
    data_dir: Path = Field(default_factory=default_data_dir)
    routing_rules: Path = Field(default_factory=lambda: default_data_dir() / ROUTING_RULES)
    hl7: Hl7Settings = Field(default_factory=Hl7Settings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    orders: OrderSettings = Field(default_factory=OrderSettings)
    topics: Topics = Field(default_factory=Topics)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    streams: StreamSettings = Field(default_factory=StreamSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    status: StatusSettings = Field(default_factory=StatusSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    operator: OperatorSettings = Field(default_factory=OperatorSettings)
    fhir_search: FhirSearchSettings = Field(default_factory=FhirSearchSettings)
    ehr: EhrSettings = Field(default_factory=EhrSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = Path(os.environ.get("RADTRIAGE_CONFIG", "radtriage.yaml"))
        return (
            init_settings,
            env_settings,
            YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file),
        )

    @model_validator(mode="after")
    def _data_under_data_dir(self) -> Settings:
        """The data paths not set on their own follow data_dir."""
        if "routing_rules" not in self.model_fields_set:
            self.routing_rules = self.data_dir / ROUTING_RULES
        if "model_repository" not in self.triton.model_fields_set:
            self.triton.model_repository = self.data_dir / MODEL_REPOSITORY
        return self

    @property
    def kafka_pom(self) -> Path:
        """The Maven POM the local Kafka broker's jars are fetched with (radtriage/stack/kafka.py)."""
        return self.data_dir / KAFKA_POM

    def inheritable_json(self) -> str:
        """These settings, secrets included, for a child process (`SETTINGS_JSON_ENV`)."""
        return self.model_dump_json(context={REVEAL_SECRETS: True})

    @cached_property
    def blob_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def trace_file(self) -> Path:
        return self.home / "traces.jsonl"


def load_settings(**overrides: object) -> Settings:
    """Settings for this process: the parent's resolved settings if we were spawned by `up`."""
    inherited = os.environ.get(SETTINGS_JSON_ENV)
    if inherited and not overrides:
        return Settings.model_validate_json(inherited)
    return Settings(**overrides)  # type: ignore[arg-type]
