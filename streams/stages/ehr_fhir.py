"""Results to the EHR as FHIR: `triage.results.fhir` -> a transaction on `ehr.fhir`'s server.

Registered only when `ehr.fhir` is configured. The worker reads `triage.results.fhir`
nowhere else, so this agent has the topic to itself: a slow or absent EHR holds back only
this consumer's offsets, never the findings, reports or alerts, which are other agents on
other topics (docs/ARCHITECTURE.md "Results to the EHR").

Each report Bundle becomes a transaction whose entries are conditional on radtriage's own
ids (processors/fhir_transaction.py): a retry, a worker killed before its offset commit, or
`radtriage replay --stage ehr-fhir` sends the same transaction again and the server keeps
one report; an amended report (the same id, status `amended`) updates it. Every outcome is
on `triage.audit` (stage "ehr"): stored (with the server's Locations), or refused (4xx, the
OperationOutcome's text) or undelivered until `retry_deadline_s` (5xx, timeouts, refused
connections), both also dead-lettered as "ehr-fhir".
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import faust
from faust.types import EventT

from processors.fhir_transaction import UnsendableBundle, build_transaction, encode
from radtriage import metrics
from radtriage.settings import EhrFhirSettings
from schemas.results import read_result
from streams.app import dead_letter
from streams.fhir_sender import Rejected, Server, Stored, deliver, post_transaction
from streams.retry import Retry
from streams.stages.common import Detail, audit, consumer_span, each
from streams.stages.context import PipelineContext

STAGE = "ehr-fhir"
log = logging.getLogger(__name__)


def auth_headers(config: EhrFhirSettings) -> dict[str, str]:
    auth = config.auth
    if auth.bearer_token is not None:
        return {"Authorization": f"Bearer {auth.bearer_token.get_secret_value()}"}
    if auth.username and auth.password is not None:
        pair = f"{auth.username}:{auth.password.get_secret_value()}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
    return {}


class ClientCertificateError(ValueError):
    """ehr.fhir's client certificate or key cannot be used (the message says which and why)."""


def _encrypted(key_file: Path) -> bool:
    try:
        return b"ENCRYPTED" in key_file.read_bytes()[:4096]
    except OSError:
        return False


def server_for(config: EhrFhirSettings) -> Server:
    """Built at registration, so a missing CA file or an unreadable client certificate stops
    the worker's start, not a send."""
    tls: ssl.SSLContext | bool | None = None
    if config.base_url.startswith("https://"):
        if config.tls_verify:
            tls = ssl.create_default_context(cafile=config.ca_file)
        elif config.client_cert_file is not None:
            # Unchecked server, but a certificate to show it: a context that checks nothing.
            tls = ssl.create_default_context()
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
        else:
            tls = False
        if isinstance(tls, ssl.SSLContext) and config.client_cert_file is not None:
            try:
                # An encrypted key would prompt on the terminal: refused with no password instead.
                tls.load_cert_chain(config.client_cert_file, config.client_key_file, password=lambda: "")
            except (OSError, ssl.SSLError) as exc:
                key = config.client_key_file or config.client_cert_file
                # OpenSSL says only "PEM lib" for a key it cannot decrypt: say it.
                hint = (
                    "; an encrypted key is not supported (decrypt it: openssl pkey)"
                    if _encrypted(key)
                    else ""
                )
                raise ClientCertificateError(
                    f"ehr.fhir client certificate {config.client_cert_file} "
                    f"(key {config.client_key_file or 'in the same file'}) cannot be loaded: {exc}{hint}"
                ) from exc
    return Server(config.base_url, auth_headers(config), tls, config.timeout_s)


def register(ctx: PipelineContext) -> None:
    config = ctx.settings.ehr.fhir
    if config is None:
        return  # no FHIR server configured: no agent, nobody reads the results topic for it
    server = server_for(config)
    retry = Retry(config.retry_deadline_s, config.retry_initial_s, config.retry_max_s)
    sessions: list[aiohttp.ClientSession] = []

    def session() -> aiohttp.ClientSession:
        # Made on first use: a ClientSession belongs to the running loop, which the worker
        # starts after registration.
        if not sessions or sessions[0].closed:
            sessions[:] = [aiohttp.ClientSession()]
        return sessions[0]

    async def send_one(event: EventT[Any]) -> None:
        # The plain Bundle and its headers, or a record of the old envelope (schemas/results.py).
        record = read_result(event.value, event.headers or ())
        result = record.meta
        attrs = {"radtriage.study_uid": result.study_uid, "radtriage.finding": result.finding}
        with consumer_span(ctx, STAGE, event, attrs=attrs) as span:
            try:
                transaction, key = build_transaction(record.bundle)
            except UnsendableBundle as exc:
                why = f"report of {result.study_uid}/{result.finding} cannot be sent: {exc}"
                log.warning("%s", why)
                await dead_letter(ctx.topics, event, STAGE, why, result.study_uid)
                metrics.observe_ehr_fhir("unsendable")
                await audit(
                    ctx, result.study_uid, result.accession_number, "ehr", "fhir_unsendable", {"reason": why}
                )
                return
            payload = encode(transaction)
            outcome = await deliver(lambda: post_transaction(session(), server, payload), retry)
            detail: Detail = {
                "server": config.base_url,
                "report_identifier": key.token,
                "finding": result.finding,
                "attempts": outcome.attempts,
            }
            if result.request_id:
                detail["request_id"] = result.request_id
            if isinstance(outcome, Stored):
                decision = "fhir_stored"
                detail["status"] = outcome.status
                detail["locations"] = " ".join(outcome.locations)
                report = [loc for loc in outcome.locations if loc.startswith("DiagnosticReport/")]
                if report:
                    detail["report_location"] = report[0]
            elif isinstance(outcome, Rejected):
                decision = "fhir_refused"
                detail |= {"status": outcome.status, "reason": outcome.reason}
                why = f"FHIR server {config.base_url} refused report {key.token}: {outcome.reason}"
                await dead_letter(ctx.topics, event, STAGE, why, result.study_uid)
            else:
                decision = "fhir_undelivered"
                detail["reason"] = outcome.reason
                why = f"report {key.token} undelivered to {config.base_url}: {outcome.reason}"
                await dead_letter(ctx.topics, event, STAGE, why, result.study_uid)
            span.set_attribute("radtriage.ehr_outcome", decision)
            metrics.observe_ehr_fhir(decision.removeprefix("fhir_"))
            await audit(ctx, result.study_uid, result.accession_number, "ehr", decision, detail)

    @ctx.app.agent(ctx.topics.results_fhir, name="ehr-fhir")
    async def ehr_fhir(stream: faust.StreamT[Any]) -> None:
        await each(ctx, stream, STAGE, send_one)

    closing: set[asyncio.Future[None]] = set()

    @ctx.app.on_before_shutdown.connect  # type: ignore[arg-type]  # mode's stub wants a sync signature
    def _close(sender: Any, **kwargs: Any) -> None:
        # The loop still runs here: the close finishes as the worker stops (as notify does).
        for s in sessions:
            if not s.closed:
                closing.add(asyncio.ensure_future(s.close()))

    _ = ehr_fhir
