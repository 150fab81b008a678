"""The `radtriage` command line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

from radtriage.logs import setup_logging
from radtriage.settings import Settings, load_settings


def _settings(bootstrap_servers: str | None = None, triton_url: str | None = None) -> Settings:
    from pydantic import ValidationError

    try:
        settings = load_settings()
    except ValidationError as exc:
        # Which key, which value, why (a bad CIDR in an allow-list, TLS without a key...).
        click.echo(f"radtriage: invalid settings: {exc}", err=True)
        sys.exit(2)
    if bootstrap_servers:
        settings.kafka.bootstrap_servers = bootstrap_servers
        settings.kafka.embedded = False
    if triton_url:
        settings.triton.grpc_url = triton_url
        settings.triton.embedded = False
    return settings


def _run_listener(command: str, component: str, serve: Callable[[Settings], None]) -> None:
    """Serve a TLS-capable listener with tracing; settings TLS cannot use exit 2 with the reason."""
    from radtriage.tls import TlsConfigError
    from radtriage.tracing_sdk import setup_tracing

    setup_logging(component=component)
    settings = _settings()
    setup_tracing(settings, command)
    try:
        serve(settings)
    except TlsConfigError as exc:
        click.echo(f"radtriage {command}: {exc}", err=True)
        sys.exit(2)


@click.group()
def main() -> None:
    """radtriage: real-time triage of medical imaging."""


@main.command()
@click.option("--bootstrap-servers", help="Use this Kafka instead of starting a local broker.")
@click.option("--triton-url", help="Use this Triton (gRPC host:port) instead of starting a local server.")
@click.option(
    "--cluster",
    "cluster_nodes",
    type=click.IntRange(1, 9),
    help="Start this many local Kafka brokers (e.g. 3: replication 3, min.insync.replicas 2).",
)
@click.option(
    "--pacs",
    is_flag=True,
    help="Also start a local Orthanc as the PACS the results (SR, key image, KOS) are sent to.",
)
@click.option("--pacs-dicom-port", default=4242, show_default=True, help="--pacs: Orthanc's DICOM port.")
@click.option(
    "--pacs-http-port", default=8042, show_default=True, help="--pacs: Orthanc's web UI and REST port."
)
def up(
    bootstrap_servers: str | None,
    triton_url: str | None,
    cluster_nodes: int | None,
    pacs: bool,
    pacs_dicom_port: int,
    pacs_http_port: int,
) -> None:
    """Start the whole local stack (Kafka, Triton, workers, DICOM/HL7/HTTP listeners); Ctrl-C stops it."""
    from radtriage.kafka_admin import KafkaUnavailable
    from radtriage.stack.orthanc import LocalOrthanc, destination
    from radtriage.stack.process import ServiceError
    from radtriage.up import run_up

    setup_logging(component="up")
    try:
        settings = _settings(bootstrap_servers, triton_url)
        if cluster_nodes is not None:
            if bootstrap_servers:
                raise click.UsageError("--cluster starts local brokers: not with --bootstrap-servers")
            settings.kafka.embedded_nodes = cluster_nodes
        local_pacs = None
        if pacs:
            # Before the worker starts: its settings (passed on whole) name the destination.
            settings.dispatch.destinations.append(destination(pacs_dicom_port))
            local_pacs = LocalOrthanc(settings.home / "pacs", pacs_dicom_port, pacs_http_port)
        run_up(settings, local_pacs)
    except (ServiceError, KafkaUnavailable) as exc:
        click.echo(f"radtriage up failed: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.option("--bootstrap-servers", help="Kafka of the running stack.")
@click.option("--runs", default=1, show_default=True, help="Send the three demo studies this many times.")
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), help="Also write every outcome as JSON here."
)
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for each study's outcome.")
def demo(bootstrap_servers: str | None, runs: int, json_out: Path | None, timeout: float) -> None:
    """Send bundled synthetic studies to a running stack and print route, finding and latency."""
    from radtriage.demo import MessageError, SendError, run_demo

    setup_logging(level="WARNING", component="demo")
    try:
        ok = run_demo(_settings(bootstrap_servers), runs=runs, json_out=json_out, timeout_s=timeout)
    except (SendError, MessageError) as exc:
        click.echo(f"radtriage demo: {exc}. Is `radtriage up` running?", err=True)
        sys.exit(2)
    sys.exit(0 if ok else 1)


@main.command()
def worker() -> None:
    """Run the Faust stream processors (started for you by `radtriage up`)."""
    from radtriage.worker import run_worker

    setup_logging(component="worker")
    run_worker(_settings())


@main.command("dicom-scp")
def dicom_scp() -> None:
    """Run the DICOM C-STORE listener (started for you by `radtriage up`)."""
    from connectors.dicom.listener import run_scp

    _run_listener("dicom-scp", "dicom", run_scp)


@main.command("hl7-listener")
def hl7_listener() -> None:
    """Run the HL7 v2 MLLP listener (started for you by `radtriage up`)."""
    from connectors.hl7.mllp import run_listener

    _run_listener("hl7-listener", "hl7", run_listener)


@main.command("http")
def http() -> None:
    """Run the HTTP port: FHIR R4 (/fhir), DICOMweb STOW-RS (/dicomweb/studies), /healthz,
    /metrics and the operator page (/)."""
    from connectors.http.server import run_http
    from radtriage.operator import page as operator_page
    from radtriage.tracing_sdk import setup_tracing

    setup_logging(component="http")
    settings = _settings()
    setup_tracing(settings, "http")
    run_http(settings, pages=[operator_page])


@main.command()
@click.option("--bootstrap-servers", help="Kafka of the running stack.")
@click.option(
    "--stage", "stage_prefix", default="", help="Only letters of this stage, e.g. infer.stat.triton or infer."
)
@click.option("--since", help="Only letters dead-lettered at or after this ISO time (UTC unless it says).")
@click.option("--study", "study_uid", default="", help="Only letters of this StudyInstanceUID.")
@click.option("--limit", type=click.IntRange(min=1), help="Replay at most this many (stat lane first).")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; publish and record nothing.")
def replay(
    bootstrap_servers: str | None,
    stage_prefix: str,
    since: str | None,
    study_uid: str,
    limit: int | None,
    dry_run: bool,
) -> None:
    """Republish dead letters' original messages to their source topics, each at most once."""
    from rich.console import Console

    from radtriage.replay import Criteria, letters_table, parse_since, run_replay, summary_table

    setup_logging(level="WARNING", component="replay")
    try:
        since_at = parse_since(since) if since else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from exc
    criteria = Criteria(stage_prefix=stage_prefix, since=since_at, study_uid=study_uid, limit=limit)
    try:
        report = run_replay(_settings(bootstrap_servers), criteria, dry_run=dry_run)
    except Exception as exc:  # Kafka unreachable, topic unreadable: say so, no traceback
        click.echo(f"radtriage replay failed: {type(exc).__name__}: {exc}", err=True)
        sys.exit(2)
    console = Console(width=max(Console().width, 160))
    if report.decisions:
        console.print(letters_table(report, dry_run=dry_run))
    console.print(summary_table(report, dry_run=dry_run))
    if report.failure:
        click.echo(f"radtriage replay stopped: {report.failure}", err=True)
        sys.exit(1)


@main.command("trace")
@click.argument("study_uid")
@click.option(
    "--file",
    "files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="JSON-lines trace file(s) to read (repeatable); default: the configured trace file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the timeline as JSON instead of a table.")
@click.option("--all", "unfold", is_flag=True, help="One row per span (do not fold repeated siblings).")
def trace_cmd(study_uid: str, files: tuple[Path, ...], as_json: bool, unfold: bool) -> None:
    """Show one study's spans as a waterfall: stage, process, start, duration, lane, model, outcome."""
    import json

    from rich.console import Console

    from radtriage.trace_view import build_timeline, load_study_spans, render_timeline, timeline_json
    from radtriage.tracing_sdk import trace_files

    settings = _settings()
    paths = list(files) or trace_files(settings.trace_file, settings.telemetry.jsonl_backups)
    missing = [p for p in paths if not p.exists()]
    if len(missing) == len(paths):
        click.echo(
            f"radtriage trace: no trace file at {', '.join(map(str, missing))} "
            "(spans are written there when telemetry.exporter is jsonl)",
            err=True,
        )
        sys.exit(2)
    spans, read, bad = load_study_spans(paths, study_uid)
    timeline = build_timeline(spans, study_uid, fold=not unfold)
    if timeline is None:
        where = ", ".join(str(p) for p in paths if p.exists())
        click.echo(
            f"radtriage trace: no spans of study {study_uid} among the {read} span(s) in {where}"
            + (f" ({bad} unreadable line(s))" if bad else "")
            + ". Check the StudyInstanceUID; spans of a study still in flight appear within a second.",
            err=True,
        )
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(timeline_json(timeline), indent=2))
        return
    console = Console(width=max(Console().width, 180))
    console.print(render_timeline(timeline))


@main.command()
@click.option("--bootstrap-servers", help="Kafka of the running stack.")
@click.option("--triton-url", help="Triton (gRPC host:port) of the running stack.")
@click.option("--watch", is_flag=True, help="Keep the screen up to date until Ctrl-C.")
@click.option("--window", "window_s", type=float, help="Seconds of history for latencies and in-flight work.")
def status(
    bootstrap_servers: str | None, triton_url: str | None, watch: bool, window_s: float | None
) -> None:
    """One screen: lanes (lag, in flight, p50/p99), models, connectors, recent alerts."""
    from rich.console import Console
    from rich.live import Live

    from radtriage.status import gather, render_status

    setup_logging(level="CRITICAL", component="status")
    settings = _settings(bootstrap_servers, triton_url)
    if window_s:
        settings.status.window_s = window_s
    console = Console(width=max(Console().width, 120))
    if not watch:
        console.print(render_status(gather(settings)))
        return
    import time

    try:
        with Live(render_status(gather(settings)), console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(settings.status.refresh_s)
                live.update(render_status(gather(settings)), refresh=True)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
