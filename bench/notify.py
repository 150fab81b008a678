"""Time to notification: alert → signed webhook received, and alert → e-mail accepted by the
SMTP server (STARTTLS), through a real Kafka and a real `radtriage worker` (issue 19).

    python -m bench.notify --alerts 20
    python -m bench.notify --alerts 20 --bleed   # real bleed studies through the whole stack
    python -m bench.notify --alerts 20 --flood 50 --cost   # + 3 floods of 50 alerts at once,
                                                           # and the notify stage's cost per alert
    python -m bench.notify --lanes-flood "--burst 40 --stat-count 8"   # stat alerts, idle vs routine flood

Starts its own single-node Kafka, a worker whose notify stage tells one on-call step of two
recipients (a JSON webhook signed with HMAC-SHA256, an e-mail), a webhook receiver that
verifies the signature (in a process of its own: tests/support/webhook_process.py, so its
receipt time does not wait for this process's GIL) and an aiosmtpd server that requires
STARTTLS (tests/support). Each
alert comes from a positive stat ICH finding published on `triage.findings` (the escalate
stage turns it into the alert; no model runs), one at a time. Measured per alert, from the
alert's own `alerted_at` (written by the escalate stage) to the receipt time at each peer,
on one clock (one machine).

With `--bleed`, the whole local stack instead (`radtriage up`'s: Kafka, Triton, worker,
listeners on free ports) and the demo's bleed study (a head CT phantom with a bleed sent
over DICOM after its STAT order), each measured from the study's `ready_at` and from its
alert's `alerted_at` to the receipts. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from rich.console import Console

from bench.kafka_read import partitions, read_from_start
from bench.output import stamped_path, write_json
from bench.summary import spread
from radtriage.settings import REPO_ROOT
from tests.certs import make_pki
from tests.integration.harness import Worker, finding_bytes, make_worker_env
from tests.support.kafka import local_kafka
from tests.support.notify_peers import smtp_env, smtp_server
from tests.support.wait import wait_until
from tests.support.webhook_process import webhook_receiver_process

console = Console()
SECRET = "bench-secret"
ONCALL = """\
version: 1
recipients:
  pager: {channels: [{webhook: pager}]}
  mail: {channels: [{email: oncall@hospital.example}]}
rules:
  - chain:
      - {recipients: [pager, mail], timeout_s: 3600}
"""


def stats(xs: list[float]) -> dict[str, float]:
    # Nearest rank; with 20 samples p99 is the maximum.
    return spread(xs, tail=0.99)


def alert_times(bootstrap: str, topic: str) -> KafkaConsumer:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    read_from_start(consumer, [topic])
    return consumer


def _text(message: Any) -> str:
    return str(message.get_payload(decode=True).decode())


def bleed_studies(n: int, tmp: Path) -> dict[str, Any]:
    """`n` demo bleed studies through `radtriage up`'s stack, notified as ONCALL says."""
    import numpy as np
    from pydantic import SecretStr

    from bench.lanes import own_stack_settings
    from radtriage.demo import CASES, OutputWatcher, run_case
    from radtriage.settings import SmtpSettings, WebhookTarget
    from radtriage.up import running_stack

    pki = make_pki(tmp / "pki")
    oncall = tmp / "oncall.yaml"
    oncall.write_text(ONCALL)
    with webhook_receiver_process(SECRET, tmp) as hooks, smtp_server(pki) as smtp:
        # The stack on ports of its own, as the lanes benchmark starts it.
        settings = own_stack_settings(tmp / "home")
        settings.telemetry.exporter = "none"
        settings.notify.webhooks = [WebhookTarget(name="pager", url=hooks.url("/pager"), secret=SECRET)]  # type: ignore[arg-type]
        settings.notify.smtp = SmtpSettings(
            host="127.0.0.1", port=smtp.port, starttls=True, sender="rt@bench.example", cafile=pki.ca
        )
        settings.notify.oncall_file = oncall
        settings.notify.ack_secret = SecretStr("bench-ack")
        with running_stack(settings):
            bleed = CASES[0]
            watcher = OutputWatcher(settings)
            rng = np.random.default_rng(19)
            ready_to_hook, alert_to_hook, ready_to_mail, ready_to_alert = [], [], [], []
            for i in range(n + 1):  # the first warms up (model load, connections)
                outcome = run_case(bleed, settings, watcher, rng, tmp, 120, 0.0)
                uid = outcome.study_uid
                wait_until(
                    lambda u=uid: (
                        any(r.body["study_uid"] == u for r in hooks.received)
                        and any(f"/operator/studies/{u}" in _text(m.message) for m in smtp.mails)
                    ),
                    f"bleed study {i} at both peers",
                    120,
                )
                if i == 0:
                    continue
                (hook,) = [r for r in hooks.received if r.body["study_uid"] == uid]
                (mail,) = [m for m in smtp.mails if f"/operator/studies/{uid}" in _text(m.message)]
                ready = datetime.fromisoformat(hook.body["ready_at"]).timestamp()
                alerted = datetime.fromisoformat(hook.body["alerted_at"]).timestamp()
                ready_to_hook.append((hook.at - ready) * 1000)
                alert_to_hook.append((hook.at - alerted) * 1000)
                ready_to_mail.append((mail.at - ready) * 1000)
                ready_to_alert.append((alerted - ready) * 1000)
            watcher.close()
        return {
            "benchmark": "notify_bleed_studies",
            "studies": n,
            "ready_to_webhook_received_ms": stats(ready_to_hook),
            "ready_to_email_accepted_ms": stats(ready_to_mail),
            "ready_to_alert_ms": stats(ready_to_alert),
            "alert_to_webhook_received_ms": stats(alert_to_hook),
            "webhook_duplicates": len(hooks.duplicates),
            "setup": "radtriage up's stack on free ports (Kafka, Triton, worker, DICOM/HL7/HTTP), demo bleed "
            "study after its STAT HL7 order; signed JSON webhook + SMTP STARTTLS on 127.0.0.1",
        }


def lanes_flood(lanes_argv: list[str], tmp: Path) -> dict[str, Any]:
    """bench/lanes.py's run (idle stat studies, then stat studies in a routine flood) with
    notification on: its stat bleed studies alert, and each alert goes to a signed webhook
    and an e-mail as ONCALL says. Per phase: alert → webhook received, ready → webhook."""
    from pydantic import SecretStr

    import bench.lanes as lanes
    from radtriage.settings import Settings, SmtpSettings, WebhookTarget

    pki = make_pki(tmp / "pki")
    oncall = tmp / "oncall.yaml"
    oncall.write_text(ONCALL)
    out = tmp / "lanes"
    with webhook_receiver_process(SECRET, tmp) as hooks, smtp_server(pki) as smtp:
        plain = lanes.own_stack_settings

        def with_notify(home: Path) -> Settings:
            settings = plain(home)
            settings.notify.webhooks = [WebhookTarget(name="pager", url=hooks.url("/pager"), secret=SECRET)]  # type: ignore[arg-type]
            settings.notify.smtp = SmtpSettings(
                host="127.0.0.1", port=smtp.port, starttls=True, sender="rt@bench.example", cafile=pki.ca
            )
            settings.notify.oncall_file = oncall
            settings.notify.ack_secret = SecretStr("bench-ack")
            return settings

        lanes.own_stack_settings = with_notify
        try:
            lanes.main([*lanes_argv, "--out", str(out)])
        finally:
            lanes.own_stack_settings = plain
        time.sleep(3.0)  # the last alerts' notifications
        received = {r.body["study_uid"]: r.at for r in hooks.received}
        mails: dict[str, float] = {}
        for m in smtp.mails:
            found = re.search(r"/operator/studies/(\S+)", _text(m.message))
            if found:
                mails[found.group(1)] = m.at
        duplicates = len(hooks.duplicates)
    (path,) = sorted(out.glob("lanes-*.json"))
    run = json.loads(path.read_text())
    phases: dict[str, dict[str, list[float]]] = {}
    missing: list[str] = []
    for study in run["studies"]:
        if not study.get("alerted_at") or study["phase"] not in ("idle", "flood"):
            continue
        uid = study["study_uid"]
        if uid not in received:
            missing.append(uid)
            continue
        alerted = datetime.fromisoformat(study["alerted_at"]).timestamp()
        ready = datetime.fromisoformat(study["ready_at"]).timestamp()
        got = phases.setdefault(study["phase"], {"alert": [], "ready": [], "mail": []})
        got["alert"].append((received[uid] - alerted) * 1000)
        got["ready"].append((received[uid] - ready) * 1000)
        if uid in mails:
            got["mail"].append((mails[uid] - alerted) * 1000)
    summary = {
        phase: {
            "alert_to_webhook_received_ms": stats(v["alert"]),
            "ready_to_webhook_received_ms": stats(v["ready"]),
            "alert_to_email_accepted_ms": stats(v["mail"]) if v["mail"] else None,
            # Per stat study in the order sent: p99 of 12 is one study, which one shows here.
            "alert_to_webhook_samples_ms": [round(x, 1) for x in v["alert"]],
        }
        for phase, v in phases.items()
    }
    ratio = None
    if "idle" in summary and "flood" in summary:
        ratio = round(
            summary["flood"]["alert_to_webhook_received_ms"]["p99"]
            / summary["idle"]["alert_to_webhook_received_ms"]["p99"],
            2,
        )
    return {
        "benchmark": "notify_lanes_flood",
        "lanes_command": " ".join(["python -m bench.lanes", *lanes_argv]),
        "phases": summary,
        "flood_over_idle_p99_alert_to_webhook": ratio,
        "alerted_but_not_received": missing,
        "webhook_duplicates": duplicates,
        "lanes_headline_stat_lane": run.get("headline_stat_lane"),
        "setup": "bench/lanes.py's own stack (Kafka, Triton, worker, listeners) with notify on: one step, "
        "signed JSON webhook + SMTP STARTTLS on 127.0.0.1",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alerts", type=int, default=20)
    ap.add_argument("--bleed", action="store_true", help="real bleed studies through the whole stack")
    ap.add_argument("--flood", type=int, default=0, help="then N alerts published at once")
    ap.add_argument("--flood-rounds", type=int, default=3, help="--flood: how many such floods")
    ap.add_argument(
        "--lanes-flood",
        metavar="LANES_ARGS",
        help="bench/lanes.py's idle and routine-flood phases with notification on, e.g. '--burst 40'",
    )
    ap.add_argument("--cost", action="store_true", help="also a run with nothing configured (notify cost)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    ap.add_argument("--workdir", type=Path, help="--bleed: keep the stack's files (logs) here")
    args = ap.parse_args()
    if args.lanes_flood is not None:
        with tempfile.TemporaryDirectory(prefix="radtriage-bench-notify-") as tmp_name:
            flood = lanes_flood(args.lanes_flood.split(), Path(tmp_name)) | {
                "at": datetime.now(UTC).isoformat()
            }
        save_and_show(flood, stamped_path(args.out, "notify-lanes-flood"))
        return
    if args.bleed:
        with tempfile.TemporaryDirectory(prefix="radtriage-bench-notify-") as tmp_name:
            work = args.workdir or Path(tmp_name)
            bleed = bleed_studies(args.alerts, work) | {"at": datetime.now(UTC).isoformat()}
        save_and_show(bleed, stamped_path(args.out, "notify-bleed"))
        return

    result: dict[str, Any] = {"benchmark": "notify", "at": datetime.now(UTC).isoformat()}
    result |= worker_bench(args.alerts, args.flood, args.flood_rounds, notify=True)
    if args.cost:
        # The same alerts with nothing configured (no notify agent): the worker's CPU and the
        # audit records without the notify stage, for its cost per alert.
        off = worker_bench(args.alerts, 0, 0, notify=False)
        result["notify_off"] = off
        result["notify_cost_per_alert"] = {
            "worker_cpu_ms": round(result["worker_cpu_ms_per_alert"] - off["worker_cpu_ms_per_alert"], 2),
            "audit_records_read": result["audit_records_per_alert"],
            "audit_records_written": round(
                result["audit_records_per_alert"] - off["audit_records_per_alert"], 2
            ),
        }
    save_and_show(result, stamped_path(args.out, "notify"))


def save_and_show(doc: dict[str, Any], path: Path) -> None:
    """Each of the three runs' ending: its JSON written to `path` and shown on the console."""
    console.print_json(write_json(path, doc))
    console.print(f"wrote {path}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (/proc, Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def end_offsets(bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    total = sum(consumer.end_offsets(partitions(consumer, [topic])).values())
    consumer.close()
    return int(total)


def worker_bench(alerts: int, flood: int, rounds: int, *, notify: bool) -> dict[str, Any]:
    """One broker, one worker: `alerts` one at a time, then `rounds` floods of `flood` alerts
    published at once. Without `notify`, nothing is configured (no notify agent) and each
    alert is waited for on its topic instead of at the peers."""
    with tempfile.TemporaryDirectory(prefix="radtriage-bench-notify-") as tmp_name:
        tmp = Path(tmp_name)
        pki = make_pki(tmp / "pki")
        oncall = tmp / "oncall.yaml"
        oncall.write_text(ONCALL)
        with (
            local_kafka(tmp / "kafka") as broker,
            webhook_receiver_process(SECRET, tmp) as hooks,
            smtp_server(pki) as smtp,
        ):
            bootstrap = broker.bootstrap_servers
            (tmp / "home").mkdir()
            setup = make_worker_env(bootstrap, tmp / "home")
            env, settings = next(setup)
            if notify:
                env.update(smtp_env(smtp, pki.ca))
                env.update(
                    {
                        "RADTRIAGE_NOTIFY__WEBHOOKS": json.dumps(
                            [{"name": "pager", "url": hooks.url("/pager"), "secret": SECRET}]
                        ),
                        "RADTRIAGE_NOTIFY__ONCALL_FILE": str(oncall),
                        "RADTRIAGE_NOTIFY__ACK_SECRET": "bench-ack",
                    }
                )
            worker = Worker(env, settings.home)
            with console.status(f"starting the worker (notify {'on' if notify else 'off'})…"):
                worker.start()
            assert worker.proc is not None
            producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
            ich_topic = settings.topics.alert_topic("ich")
            seen = alert_times(bootstrap, ich_topic)
            alerted: dict[str, float] = {}

            def read_alerts() -> int:
                for recs in seen.poll(timeout_ms=50).values():
                    for r in recs:
                        value = json.loads(r.value)
                        alerted[value["study_uid"]] = datetime.fromisoformat(value["alerted_at"]).timestamp()
                return len(alerted)

            def arrived(n: int) -> bool:
                if notify:
                    return len(hooks.received) >= n and len(smtp.mails) >= n
                return read_alerts() >= n

            uids: list[str] = []
            floods: list[list[str]] = []
            cpu_used = 0.0
            try:
                for i in range(alerts + 1):  # the first one warms up (connections, JIT)
                    uid = f"1.2.826.0.19.9.{time.time_ns()}"
                    before = cpu_s(worker.proc.pid)
                    producer.send(
                        settings.topics.findings, key=uid.encode(), value=finding_bytes(uid, 0.95)
                    ).get(10)
                    wait_until(lambda n=i + 1: arrived(n), f"alert {i} arrived", 60)
                    if i > 0:
                        cpu_used += cpu_s(worker.proc.pid) - before
                    uids.append(uid)
                    time.sleep(0.3)
                for r in range(rounds):
                    batch = [f"1.2.826.0.19.10.{r}.{j}.{time.time_ns()}" for j in range(flood)]
                    for uid in batch:  # all at once: sent without waiting, then flushed
                        producer.send(
                            settings.topics.findings, key=uid.encode(), value=finding_bytes(uid, 0.95)
                        )
                    producer.flush(30)
                    total = len(uids) + sum(map(len, floods)) + flood
                    wait_until(lambda n=total: arrived(n), f"flood {r} arrived", 120)
                    floods.append(batch)
                    time.sleep(1.0)
                audit_records = end_offsets(bootstrap, settings.topics.audit)
            finally:
                worker.kill(signal.SIGTERM)
                next(setup, None)
            deadline = time.monotonic() + 30
            everything = uids + [u for b in floods for u in b]
            while len(alerted) < len(everything) and time.monotonic() < deadline:
                read_alerts()
            seen.close()
            hook_at = {r.body["study_uid"]: r.at for r in hooks.received}
            mail_at: dict[str, float] = {}
            wanted = set(everything)
            for m in smtp.mails:
                found = re.search(r"/operator/studies/(\S+)", _text(m.message))
                if found and found.group(1) in wanted:
                    mail_at[found.group(1)] = m.at
            measured = uids[1:]
            result: dict[str, Any] = {
                "notify": notify,
                "alerts": len(measured),
                "worker_cpu_ms_per_alert": round(cpu_used * 1000 / max(1, len(measured)), 2),
                "audit_records_per_alert": round(audit_records / max(1, len(everything)), 2),
                "setup": "1 Kafka broker, 1 worker, signed JSON webhook + SMTP STARTTLS on 127.0.0.1, "
                "one alert at a time" + (f", then {rounds} x {flood} alerts at once" if rounds else ""),
            }
            if notify:
                result["alert_to_webhook_received_ms"] = stats(
                    [(hook_at[u] - alerted[u]) * 1000 for u in measured]
                )
                result["alert_to_email_accepted_ms"] = stats(
                    [(mail_at[u] - alerted[u]) * 1000 for u in measured]
                )
                result["webhook_duplicates"] = len(hooks.duplicates)
                if floods:
                    flooded = [u for b in floods for u in b]
                    result["flood"] = {
                        "alerts_at_once": flood,
                        "rounds": rounds,
                        "alert_to_webhook_received_ms": stats(
                            [(hook_at[u] - alerted[u]) * 1000 for u in flooded]
                        ),
                        "alert_to_email_accepted_ms": stats(
                            [(mail_at[u] - alerted[u]) * 1000 for u in flooded]
                        ),
                        # From the flood's first alert: how long the last one waited in total.
                        "last_webhook_after_first_alert_ms": [
                            round((max(hook_at[u] for u in b) - min(alerted[u] for u in b)) * 1000, 1)
                            for b in floods
                        ],
                    }
            return result


if __name__ == "__main__":
    main()
