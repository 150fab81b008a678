"""POSTing one FHIR transaction to the EHR's FHIR server, retried to a deadline.

The outcome is a value the stage (streams/stages/ehr_fhir.py) turns into an audit event or
a dead letter:

- `Stored`: 2xx; the server's transaction-response names what it stored (`Location`s);
- `Rejected`: any other 4xx but 408/429: the server read the request and refused it (an
  invalid resource, a failed validation, no permission); its OperationOutcome's text is
  kept. The same transaction would be refused again, so it is not retried;
- `Undelivered`: 5xx, 408, 429, a timeout, a refused or broken connection, on every
  attempt until the deadline: the last attempt's reason is kept.

Resending is harmless: every entry of the transaction is conditional on radtriage's own
identifier (processors/fhir_transaction.py), so a retry after a lost answer updates the
report it created instead of creating a second one.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp

from processors.fhir_transaction import outcome_text, stored_locations
from streams.retry import Retry, Undelivered, until_answered

log = logging.getLogger(__name__)

# A transaction-response or an OperationOutcome is a few KB; more is not read.
RESPONSE_MAX_BYTES = 1 << 20
# Worth another try: the server is busy, restarting, or timed out itself.
TRANSIENT_STATUSES = frozenset({408, 425, 429})
FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True)
class Stored:
    status: int
    locations: tuple[str, ...]
    attempts: int


@dataclass(frozen=True)
class Rejected:
    status: int
    reason: str  # the OperationOutcome's issues, else the body's start
    attempts: int


Outcome = Stored | Rejected | Undelivered


class NotStored(Exception):
    """This attempt failed in a way another attempt may not (the message says how)."""


@dataclass(frozen=True)
class Server:
    base_url: str
    headers: Mapping[str, str]  # Authorization, when configured
    # None: plain http; False: https without checking the certificate; a context: checked.
    ssl: ssl.SSLContext | bool | None
    timeout_s: float


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(65536):
        body += chunk[: RESPONSE_MAX_BYTES - len(body)]
        if len(body) >= RESPONSE_MAX_BYTES:
            break
    return bytes(body)


async def post_transaction(
    session: aiohttp.ClientSession, server: Server, payload: bytes
) -> Stored | Rejected:
    """One attempt: POST the transaction Bundle to the server's base (FHIR R4 http.html#transaction)."""
    url = server.base_url.rstrip("/")
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, **server.headers}
    try:
        async with session.post(
            url,
            data=payload,
            headers=headers,
            ssl=server.ssl if server.ssl is not None else True,
            timeout=aiohttp.ClientTimeout(total=server.timeout_s),
            allow_redirects=False,
        ) as response:
            body = await _read_bounded(response)
            status = response.status
    except TimeoutError:
        raise NotStored(f"no answer from {url} within {server.timeout_s:g} s") from None
    except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
        raise NotStored(f"cannot reach {url}: {type(exc).__name__}: {exc}") from exc
    if 200 <= status < 300:
        return Stored(status, tuple(stored_locations(body)), 1)
    if status >= 500 or status in TRANSIENT_STATUSES:
        raise NotStored(f"HTTP {status} from {url}: {outcome_text(body, 500)}")
    return Rejected(status, f"HTTP {status}: {outcome_text(body)}", 1)


async def deliver(
    send: Callable[[], Awaitable[Stored | Rejected]],
    retry: Retry,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Outcome:
    """`send` until the server answers for good (stored or refused), or the deadline passes."""
    answered = await until_answered(send, retry, NotStored, "FHIR transaction", clock=clock, sleep=sleep)
    if isinstance(answered, Undelivered):
        return answered
    answer, attempts = answered
    if isinstance(answer, Stored):
        return Stored(answer.status, answer.locations, attempts)
    return Rejected(answer.status, answer.reason, attempts)
