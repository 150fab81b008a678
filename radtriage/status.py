"""`radtriage status`: lanes, models, connectors and recent alerts on one screen.

Gathering talks to Kafka (kafka-python), Triton (tritonclient gRPC) and the listeners'
ports, each probe bounded by `status.probe_timeout_s` and run on its own daemon thread
with a hard deadline, so an unreachable or wedged service shows as DOWN and the
command never hangs. Rendering is a pure function of a `Snapshot`.

Per lane: consumer lag of the Faust group (the app id) on `triage.requests.<lane>`
(end offset - committed offset; a partition never committed counts from its first
record), requests in flight (routed in the window, neither a finding nor a dead letter
yet for that study and rule), and p50/p99 of ready → finding from the `triage.findings`
events' own `ready_at`/`inferred_at` of the window.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from radtriage.kafka_lag import lag_by_lane
from radtriage.settings import LANES, NotifySettings, Settings

T = TypeVar("T")


# -- the snapshot --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaneStatus:
    lane: str
    topic: str
    lag: int | None  # None: not known (Kafka down, or the group never committed)
    in_flight: int | None
    findings: int
    p50_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class ModelStatus:
    name: str
    up: bool
    version: str
    detail: str = ""


@dataclass(frozen=True)
class ConnectorStatus:
    name: str
    address: str
    reachable: bool
    topic: str
    last_message_at: datetime | None


@dataclass(frozen=True)
class AlertRow:
    alerted_at: datetime
    study_uid: str
    finding: str
    probability: float
    lane: str
    model: str
    ready_to_alert_ms: float


@dataclass(frozen=True)
class Snapshot:
    taken_at: datetime
    window_s: float
    bootstrap_servers: str
    group: str
    kafka_up: bool
    kafka_detail: str
    triton_url: str
    triton_up: bool
    triton_detail: str
    lanes: tuple[LaneStatus, ...]
    models: tuple[ModelStatus, ...]
    connectors: tuple[ConnectorStatus, ...]
    alerts: tuple[AlertRow, ...]
    # Who alerts reach (notify_summary); "" in snapshots made before notification existed.
    notify: str = ""


# -- pure logic ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(xs)))
    return xs[min(rank, len(xs)) - 1]


def consumer_lag(
    end: Mapping[tuple[str, int], int],
    committed: Mapping[tuple[str, int], int],
    beginning: Mapping[tuple[str, int], int],
) -> dict[str, int]:
    """Records not yet consumed by the group, per topic (the same arithmetic as /metrics)."""
    return lag_by_lane({topic: topic for topic, _ in end}, end, committed, beginning)


def _at(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def ready_to_finding_ms(findings: Iterable[Mapping[str, Any]], since: datetime) -> dict[str, list[float]]:
    """ready_at → inferred_at of each finding inferred at or after `since`, by lane."""
    out: dict[str, list[float]] = {lane: [] for lane in LANES}
    for f in findings:
        ready, inferred = _at(f.get("ready_at")), _at(f.get("inferred_at"))
        if ready is None or inferred is None or inferred < since:
            continue
        out.setdefault(str(f.get("lane", "")), []).append((inferred - ready).total_seconds() * 1000.0)
    return out


def in_flight(
    requests: Iterable[Mapping[str, Any]],
    findings: Iterable[Mapping[str, Any]],
    dead_letters: Iterable[Mapping[str, Any]],
) -> dict[str, int]:
    """Routed work with no outcome yet, per lane: one per study and rule, on its latest lane
    (a request upgraded from routine to stat counts once, on stat)."""
    done = {(f.get("study_uid"), f.get("rule_id")) for f in findings}
    dead = {d.get("study_uid") for d in dead_letters if d.get("study_uid")}
    latest: dict[tuple[Any, Any], str] = {}
    for r in requests:
        key = (r.get("study_uid"), r.get("rule_id"))
        if key in done or key[0] in dead:
            continue
        latest[key] = str(r.get("lane", ""))
    out: dict[str, int] = dict.fromkeys(LANES, 0)
    for lane in latest.values():
        out[lane] = out.get(lane, 0) + 1
    return out


def recent_alerts(alerts: Iterable[Mapping[str, Any]], limit: int) -> list[AlertRow]:
    rows = []
    for a in alerts:
        at, ready = _at(a.get("alerted_at")), _at(a.get("ready_at"))
        if at is None:
            continue
        rows.append(
            AlertRow(
                alerted_at=at,
                study_uid=str(a.get("study_uid", "")),
                finding=str(a.get("finding", "")),
                probability=float(a.get("probability", 0.0)),
                lane=str(a.get("lane", "")),
                model=f"{a.get('model_name', '')} v{a.get('model_version', '')}",
                ready_to_alert_ms=(at - ready).total_seconds() * 1000.0 if ready else float("nan"),
            )
        )
    rows.sort(key=lambda r: r.alerted_at, reverse=True)
    return rows[:limit]


def _ago(at: datetime | None, now: datetime) -> str:
    if at is None:
        return "never"
    s = max((now - at).total_seconds(), 0.0)
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.0f} d ago"


def _num(value: float | int | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.0f}{unit}"


def _state(up: bool) -> Text:
    return Text("UP", style="bold green") if up else Text("DOWN", style="bold red")


def notify_summary(n: NotifySettings) -> str:
    """Where alerts go beyond their topics (streams/stages/notify.py), in one line."""
    if not n.configured:
        off = "OFF: nothing configured (notify.webhooks, notify.oncall_file): no alert is sent to anyone"
        return off + ("; " + _operators_summary(n) if n.operators.configured else "")
    parts = [f"{len(n.webhooks)} webhook(s)"] if n.webhooks else []
    parts.append(f"e-mail via {n.smtp.host}:{n.smtp.port}" if n.smtp.host else "no e-mail (notify.smtp.host)")
    parts.append(
        f"on-call file {n.oncall_file}" if n.oncall_file else "no on-call file: every webhook, no escalation"
    )
    if not n.ack_secret.get_secret_value():
        parts.append("no acknowledgement links (notify.ack_secret)")
    parts.append(_operators_summary(n))
    return ", ".join(parts)


def _operators_summary(n: NotifySettings) -> str:
    ops = n.operators
    if not ops.configured:
        return "operators not notified (notify.operators)"
    watched = "dead letters" if ops.deadletters else ""
    if ops.stuck_after_s:
        watched += (" and " if watched else "") + "stuck studies"
    return f"operators told of {watched or 'nothing'} every {ops.digest_s:g} s at most"


def _table(title: str, *columns: str) -> Table:
    """A left-titled table; a column named ">name" is right-justified (a number)."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        if column.startswith(">"):
            table.add_column(column[1:], justify="right")
        else:
            table.add_column(column)
    return table


def render_status(snap: Snapshot) -> RenderableType:
    """The status screen for a snapshot (pure: same snapshot, same screen)."""
    now = snap.taken_at
    window = f"{snap.window_s / 60:g} min"
    head = Text.assemble(
        ("radtriage status", "bold"),
        f"  {now:%Y-%m-%d %H:%M:%S} UTC\n",
        "Kafka  ",
        _state(snap.kafka_up),
        f" {snap.bootstrap_servers}",
        (f"  {snap.kafka_detail}" if snap.kafka_detail else "", "red"),
        "\nTriton ",
        _state(snap.triton_up),
        f" {snap.triton_url}",
        (f"  {snap.triton_detail}" if snap.triton_detail else "", "red"),
        "\nNotify ",
        (snap.notify, "red" if snap.notify.startswith("OFF") else ""),
    )

    lanes = _table(
        f"lanes (group '{snap.group}', last {window})",
        "lane",
        "topic",
        ">lag",
        ">in flight",
        ">findings",
        ">ready→finding p50",
        ">p99",
    )
    for ln in snap.lanes:
        lag_style = "red" if ln.lag else ""
        lanes.add_row(
            Text(ln.lane, style="bold red" if ln.lane == "stat" else "bold"),
            ln.topic,
            Text(_num(ln.lag), style=lag_style),
            _num(ln.in_flight),
            str(ln.findings) if snap.kafka_up else "-",
            _num(ln.p50_ms, " ms"),
            _num(ln.p99_ms, " ms"),
        )

    models = _table("models (Triton)", "model", "state", "version", "detail")
    for m in snap.models:
        models.add_row(m.name, _state(m.up), m.version or "-", m.detail)
    if not snap.models:
        models.add_row("(no model known)", _state(False), "-", snap.triton_detail)

    connectors = _table("connectors", "connector", "listening on", "state", "last message", "topic")
    for c in snap.connectors:
        last = _ago(c.last_message_at, now) if snap.kafka_up else "- (Kafka DOWN)"
        connectors.add_row(c.name, c.address, _state(c.reachable), last, c.topic)

    alerts = _table(
        f"recent alerts (last {len(snap.alerts)})",
        *("when", "study", "finding", ">p", "lane", "model", ">ready→alert"),
    )
    for a in snap.alerts:
        alerts.add_row(
            _ago(a.alerted_at, now),
            a.study_uid,
            Text(a.finding, style="bold red"),
            f"{a.probability:.2f}",
            a.lane,
            a.model,
            _num(a.ready_to_alert_ms, " ms"),
        )
    if not snap.alerts:
        alerts.add_row("-", "(none)" if snap.kafka_up else "(Kafka DOWN)", "", "", "", "", "")
    return Group(head, lanes, models, connectors, alerts)


# -- gathering (side effects) --------------------------------------------------------------------


class ProbeTimeout(RuntimeError):
    pass


def bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run `fn` on a daemon thread; give up after `timeout_s` (the thread is abandoned, and a
    daemon thread never keeps the process alive)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"status-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ProbeTimeout(f"{what}: no answer within {timeout_s:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _reason(exc: BaseException) -> str:
    text, name = str(exc).strip(), type(exc).__name__
    # kafka-python's messages already start with their class name.
    return (text if text.startswith(name) else f"{name}: {text}" if text else name)[:120]


@dataclass
class KafkaView:
    lag: dict[str, int] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    last_message: dict[str, datetime | None] = field(default_factory=dict)


def read_kafka(settings: Settings, since: datetime, timeout_s: float) -> KafkaView:
    """Everything `status` needs from Kafka, with every client call bounded by `timeout_s`."""
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

    from radtriage.kafka_clients import kafka_python_kwargs

    ms = max(int(timeout_s * 1000), 200)
    common: dict[str, Any] = {
        **kafka_python_kwargs(settings.kafka),
        "request_timeout_ms": ms,
        "bootstrap_timeout_ms": ms,
        "reconnect_backoff_max_ms": 500,
        "client_id": "radtriage-status",
    }
    t = settings.topics
    lane_topics = [t.lane_topic(lane) for lane in LANES]
    view = KafkaView()
    consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **common)
    admin: Any = None
    try:
        read = [*lane_topics, t.findings, t.deadletter, *t.alert_topics(), t.instances, t.orders]
        parts_of = {
            topic: [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            for topic in read
        }
        lane_parts = [tp for topic in lane_topics for tp in parts_of[topic]]
        every = [tp for parts in parts_of.values() for tp in parts]
        end = consumer.end_offsets(every, timeout_ms=ms)
        beginning = consumer.beginning_offsets(every, timeout_ms=ms)

        admin = KafkaAdminClient(**common)
        group = settings.streams.app_id
        committed = admin.list_group_offsets({group: lane_parts}).get(group, {})
        view.lag = consumer_lag(
            {(tp.topic, tp.partition): int(end[tp]) for tp in lane_parts},
            {(tp.topic, tp.partition): int(m.offset) for tp, m in committed.items()},
            {(tp.topic, tp.partition): int(beginning[tp]) for tp in lane_parts},
        )

        since_ms = int(since.timestamp() * 1000)
        window_parts = lane_parts + parts_of[t.findings] + parts_of[t.deadletter]
        found = consumer.offsets_for_times(dict.fromkeys(window_parts, since_ms), timeout_ms=ms)
        starts = {tp: (o.offset if o is not None else int(end[tp])) for tp, o in found.items()}
        # The alert topics: the last `recent_alerts` of each partition.
        n = settings.status.recent_alerts
        for topic in t.alert_topics():
            for tp in parts_of[topic]:
                starts[tp] = max(int(beginning[tp]), int(end[tp]) - n)
        # Intake topics: the newest record of each partition, for "last message".
        for topic in (t.instances, t.orders):
            for tp in parts_of[topic]:
                starts[tp] = max(int(beginning[tp]), int(end[tp]) - 1)
        records = _read_ranges(consumer, starts, {tp: int(end[tp]) for tp in starts}, timeout_s)
        for tp, recs in records.items():
            for timestamp_ms, value in recs:
                if tp.topic in (t.instances, t.orders):
                    at = datetime.fromtimestamp(timestamp_ms / 1000.0, UTC)
                    prev = view.last_message.get(tp.topic)
                    view.last_message[tp.topic] = at if prev is None or at > prev else prev
                    continue
                try:
                    data = json.loads(value)
                except ValueError:
                    continue
                if not isinstance(data, dict):
                    continue
                if tp.topic in lane_topics:
                    view.requests.append(data)
                elif tp.topic == t.findings:
                    view.findings.append(data)
                elif tp.topic == t.deadletter:
                    view.dead_letters.append(data)
                else:
                    view.alerts.append(data)
        for topic in (t.instances, t.orders):
            view.last_message.setdefault(topic, None)
    finally:
        consumer.close()
        if admin is not None:
            admin.close()
    return view


def _read_ranges(
    consumer: Any, starts: Mapping[Any, int], ends: Mapping[Any, int], timeout_s: float, cap: int = 20000
) -> dict[Any, list[tuple[int, bytes]]]:
    """Records [start, end) of each partition, until done, `cap` records, or the deadline."""
    wanted = {tp: s for tp, s in starts.items() if ends[tp] > s}
    out: dict[Any, list[tuple[int, bytes]]] = {tp: [] for tp in wanted}
    if not wanted:
        return out
    consumer.assign(list(wanted))
    for tp, offset in wanted.items():
        consumer.seek(tp, offset)
    deadline = time.monotonic() + timeout_s
    pending = set(wanted)
    total = 0
    while pending and total < cap and time.monotonic() < deadline:
        for tp, recs in consumer.poll(timeout_ms=100, max_records=2000).items():
            for r in recs:
                if r.offset < ends[tp]:
                    out[tp].append((int(r.timestamp), r.value or b""))
                    total += 1
        pending = {tp for tp in pending if consumer.position(tp) < ends[tp]}
    return out


def read_models(settings: Settings, timeout_s: float) -> list[ModelStatus]:
    """The routing rules' models (in the version they name) and whatever else Triton's
    repository holds, with state."""
    from tritonclient.grpc import InferenceServerClient

    from schemas.routing_rules import RoutingRules

    try:
        rules = RoutingRules.load(settings.routing_rules).rules
    except Exception:  # an unreadable rules file must not hide Triton's own view
        rules = []
    wanted = list(dict.fromkeys(r.model for r in rules))
    # The version a rule pins ("" = whatever Triton serves); the last rule naming one wins.
    pinned = {r.model: r.model_version for r in rules if r.model_version}
    client = InferenceServerClient(settings.triton.grpc_url)
    try:
        index = client.get_model_repository_index(
            headers=settings.triton.grpc_auth_headers(), as_json=True, client_timeout=timeout_s
        )
        entries = {}
        for m in index.get("models", []):
            name = m.get("name", "")
            if name in pinned:
                if str(m.get("version", "")) == pinned[name]:
                    entries[name] = m
            # Several versions: keep the ready one, else the last listed.
            elif name not in entries or m.get("state") == "READY":
                entries[name] = m
        out = []
        for name in list(dict.fromkeys([*wanted, *entries])):
            m = entries.get(name)
            if m is None:
                where = f"version {pinned[name]} " if name in pinned else ""
                detail = f"{where}not in Triton's model repository"
                out.append(ModelStatus(name, False, pinned.get(name, ""), detail))
                continue
            ready = m.get("state") == "READY"
            detail = "" if ready else f"{m.get('state', 'UNKNOWN')} {m.get('reason', '')}".strip()
            if name in wanted:
                detail = detail or "routed to by rules"
            out.append(ModelStatus(name, ready, str(m.get("version", "")), detail))
        return out
    finally:
        client.close()


def port_open(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _local(bind_address: str) -> str:
    return "127.0.0.1" if bind_address in ("0.0.0.0", "", "::") else bind_address


def _in_parallel(probes: Mapping[str, Callable[[], Any]], deadline_s: float) -> dict[str, Any]:
    """Run each probe on a daemon thread and wait for all of them at most `deadline_s`.

    The result maps a probe's name to its value, or `<name>_error` to what it raised; a
    probe still running at the deadline is in neither (its thread is abandoned).
    """
    results: dict[str, Any] = {}

    def run(name: str, probe: Callable[[], Any]) -> None:
        try:
            results[name] = probe()
        except BaseException as exc:  # reported as the probe's error
            results[f"{name}_error"] = exc

    threads = [
        threading.Thread(target=run, args=(name, probe), name=f"status-{name}", daemon=True)
        for name, probe in probes.items()
    ]
    for th in threads:
        th.start()
    deadline = time.monotonic() + deadline_s
    for th in threads:
        th.join(max(deadline - time.monotonic(), 0.0))
    return results


def _down_detail(value: object, error: BaseException | None) -> str:
    """Why a probe's service counts as DOWN ("" when it answered)."""
    if value is not None:
        return ""
    return _reason(error) if error else "no answer"


def _models_known_offline(settings: Settings) -> list[ModelStatus]:
    """With Triton unreachable: the models the routing rules name, each DOWN."""
    try:
        from schemas.routing_rules import RoutingRules

        names = dict.fromkeys(r.model for r in RoutingRules.load(settings.routing_rules).rules)
    except Exception:
        names = {}
    return [ModelStatus(n, False, "", "Triton unreachable") for n in names]


def _listeners(settings: Settings) -> dict[str, tuple[str, int, tuple[str, ...]]]:
    """The intake listeners: name -> (host to probe, port, the topics they publish to)."""
    t = settings.topics
    return {
        "DICOM C-STORE": (_local(settings.dicom.bind_address), settings.dicom.main_port, (t.instances,)),
        "HL7 MLLP": (_local(settings.hl7.bind_address), settings.hl7.port, (t.orders,)),
        "HTTP (FHIR, STOW-RS)": (
            _local(settings.http.bind_address),
            settings.http.port,
            (t.orders, t.instances),
        ),
    }


def _connectors(
    settings: Settings, open_ports: Mapping[str, bool], last: Mapping[str, datetime | None]
) -> tuple[ConnectorStatus, ...]:
    return tuple(
        ConnectorStatus(
            name,
            f"{host}:{port}",
            open_ports.get(name, False),
            ", ".join(topics),
            max((x for x in (last.get(topic) for topic in topics) if x), default=None),
        )
        for name, (host, port, topics) in _listeners(settings).items()
    )


def _lanes(settings: Settings, view: KafkaView | None, since: datetime) -> tuple[LaneStatus, ...]:
    latencies = ready_to_finding_ms(view.findings, since) if view else {}
    flying = in_flight(view.requests, view.findings, view.dead_letters) if view else {}
    return tuple(
        LaneStatus(
            lane=lane,
            topic=settings.topics.lane_topic(lane),
            lag=view.lag.get(settings.topics.lane_topic(lane)) if view else None,
            in_flight=flying.get(lane, 0) if view else None,
            findings=len(latencies.get(lane, [])),
            p50_ms=percentile(latencies.get(lane, []), 50),
            p99_ms=percentile(latencies.get(lane, []), 99),
        )
        for lane in LANES
    )


def gather(settings: Settings, now: datetime | None = None) -> Snapshot:
    """Probe everything in parallel; anything that fails or times out is DOWN in the snapshot."""
    cfg = settings.status
    now = now or datetime.now(UTC)
    since = now - timedelta(seconds=cfg.window_s)
    timeout = cfg.probe_timeout_s
    listeners = _listeners(settings)
    results = _in_parallel(
        {
            # Kafka's reads are several round trips: their own budget, within a hard deadline.
            "kafka": lambda: bounded(lambda: read_kafka(settings, since, timeout), timeout * 4, "Kafka"),
            "triton": lambda: bounded(lambda: read_models(settings, timeout), timeout * 2, "Triton"),
            "ports": lambda: {name: port_open(h, p, timeout) for name, (h, p, _) in listeners.items()},
        },
        timeout * 4 + 1.0,
    )
    view: KafkaView | None = results.get("kafka")
    models: list[ModelStatus] | None = results.get("triton")
    return Snapshot(
        taken_at=now,
        window_s=cfg.window_s,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group=settings.streams.app_id,
        kafka_up=view is not None,
        kafka_detail=_down_detail(view, results.get("kafka_error")),
        triton_url=settings.triton.grpc_url,
        triton_up=models is not None,
        triton_detail=_down_detail(models, results.get("triton_error")),
        lanes=_lanes(settings, view, since),
        models=tuple(models if models is not None else _models_known_offline(settings)),
        connectors=_connectors(settings, results.get("ports", {}), view.last_message if view else {}),
        alerts=tuple(recent_alerts(view.alerts, cfg.recent_alerts)) if view else (),
        notify=notify_summary(settings.notify),
    )
