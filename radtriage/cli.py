"""The `radtriage` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from radtriage.logs import setup_logging
from radtriage.settings import Settings, load_settings


def _settings(bootstrap_servers: str | None = None, triton_url: str | None = None) -> Settings:
    settings = load_settings()
    if bootstrap_servers:
        settings.kafka.bootstrap_servers = bootstrap_servers
        settings.kafka.embedded = False
    if triton_url:
        settings.triton.grpc_url = triton_url
        settings.triton.embedded = False
    return settings


@click.group()
def main() -> None:
    """radtriage: real-time triage of medical imaging."""


@main.command()
@click.option("--bootstrap-servers", help="Use this Kafka instead of starting a local broker.")
@click.option("--triton-url", help="Use this Triton (gRPC host:port) instead of starting a local server.")
def up(bootstrap_servers: str | None, triton_url: str | None) -> None:
    """Start the whole local stack (Kafka, Triton, workers, DICOM/HL7/HTTP listeners); Ctrl-C stops it."""
    from radtriage.kafka_admin import KafkaUnavailable
    from radtriage.stack.process import ServiceError
    from radtriage.up import run_up

    setup_logging(component="up")
    try:
        run_up(_settings(bootstrap_servers, triton_url))
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
    from connectors.dicom.scp import run_scp
    from radtriage.telemetry import setup_tracing

    setup_logging(component="dicom")
    settings = _settings()
    setup_tracing(settings, "dicom-scp")
    run_scp(settings)


@main.command("hl7-listener")
def hl7_listener() -> None:
    """Run the HL7 v2 MLLP listener (started for you by `radtriage up`)."""
    from connectors.hl7.mllp import run_listener
    from radtriage.telemetry import setup_tracing

    setup_logging(component="hl7")
    settings = _settings()
    setup_tracing(settings, "hl7-listener")
    run_listener(settings)


@main.command("http")
def http() -> None:
    """Run the HTTP intake: FHIR R4 (/fhir), DICOMweb STOW-RS (/dicomweb/studies), /healthz."""
    from connectors.http.server import run_http
    from radtriage.telemetry import setup_tracing

    setup_logging(component="http")
    settings = _settings()
    setup_tracing(settings, "http")
    run_http(settings)


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


if __name__ == "__main__":
    main()
