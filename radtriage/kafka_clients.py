"""Kafka connection settings -> keyword arguments of each client library radtriage uses.

One place turns `KafkaSettings` (bootstrap servers, security protocol, SASL, TLS) into what
kafka-python (connectors, CLI tools), aiokafka (operator page, alert ledger) and Faust
(the workers) expect, so a secured cluster is configured once, the same way, for every
process. Producers get acks=all and idempotence here too: a retried batch is never
written twice, and a write counts only once every in-sync replica has it.

Library facts these rest on (kafka-python 3.0.12, aiokafka 0.14.0, faust-streaming 0.15.3):
- kafka-python and aiokafka both take `security_protocol`, `sasl_mechanism`,
  `sasl_plain_username`, `sasl_plain_password` (the names are historic: they carry SCRAM
  credentials too) and an `ssl_context`; kafka-python ignores its other ssl_* options when
  one is given, so both libraries verify brokers through the same context (CA + hostname).
- Faust takes `broker_credentials=faust.SASLCredentials(..., mechanism=, ssl_context=)`
  (SCRAM-SHA-256/512 are members of faust.types.auth.SASLMechanism) or
  `faust.SSLCredentials(context)` for TLS without SASL.
- Faust turns on `enable_idempotence` only inside transactions (exactly_once); its producer
  class is subclassed below to ask for it always.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Iterator, Mapping
from typing import Any

from radtriage.settings import KafkaSettings

FAUST_SCHEME = "radtriage-kafka"


class KafkaConfigError(ValueError):
    """The Kafka settings cannot work (e.g. SASL without a username); said at start, not at first send."""


def as_kafka_settings(kafka: KafkaSettings | str) -> KafkaSettings:
    """Settings as given, or a plaintext connection to a bare bootstrap list (tests, benches)."""
    return KafkaSettings(bootstrap_servers=kafka) if isinstance(kafka, str) else kafka


def ssl_context(k: KafkaSettings) -> ssl.SSLContext | None:
    """A client TLS context verifying the brokers (CA file or system CAs, and hostname)."""
    if not k.uses_tls:
        return None
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(k.ssl_cafile) if k.ssl_cafile else None
        )
        if k.ssl_certfile is not None:
            ctx.load_cert_chain(str(k.ssl_certfile), str(k.ssl_keyfile) if k.ssl_keyfile else None)
    except (OSError, ssl.SSLError) as exc:
        raise KafkaConfigError(f"Kafka TLS files unusable: {exc}") from exc
    return ctx


def _sasl_credentials(k: KafkaSettings) -> tuple[str, str]:
    if not k.sasl_username:
        raise KafkaConfigError(f"kafka.security_protocol {k.security_protocol} needs kafka.sasl_username")
    try:
        password = k.password()
    except ValueError as exc:
        raise KafkaConfigError(str(exc)) from exc
    if not password:
        raise KafkaConfigError(
            f"kafka.security_protocol {k.security_protocol} needs kafka.sasl_password or sasl_password_file"
        )
    return k.sasl_username, password


def security_kwargs(k: KafkaSettings) -> dict[str, Any]:
    """Security options common to kafka-python and aiokafka (same parameter names)."""
    kwargs: dict[str, Any] = {"security_protocol": k.security_protocol}
    if k.uses_sasl:
        user, password = _sasl_credentials(k)
        kwargs.update(sasl_mechanism=k.sasl_mechanism, sasl_plain_username=user, sasl_plain_password=password)
    ctx = ssl_context(k)
    if ctx is not None:
        kwargs["ssl_context"] = ctx
    return kwargs


def kafka_python_kwargs(k: KafkaSettings) -> dict[str, Any]:
    """For kafka-python's KafkaConsumer and KafkaAdminClient."""
    return {"bootstrap_servers": k.bootstrap_servers, **security_kwargs(k)}


def kafka_python_producer_kwargs(k: KafkaSettings) -> dict[str, Any]:
    """For kafka-python's KafkaProducer: acks=all, idempotent (set explicitly so a conflicting
    option raises instead of silently dropping idempotence)."""
    return {**kafka_python_kwargs(k), "acks": "all", "enable_idempotence": True}


def aiokafka_kwargs(k: KafkaSettings) -> dict[str, Any]:
    """For aiokafka's AIOKafkaConsumer / AIOKafkaAdminClient."""
    return {"bootstrap_servers": k.bootstrap_servers, **security_kwargs(k)}


def aiokafka_producer_kwargs(k: KafkaSettings) -> dict[str, Any]:
    return {**aiokafka_kwargs(k), "acks": "all", "enable_idempotence": True}


def faust_broker_url(bootstrap_servers: str) -> str:
    """Faust's broker URL list, on the transport registered below (aiokafka + idempotence)."""
    _register_faust_transport()
    hosts = [h.strip() for h in bootstrap_servers.split(",") if h.strip()]
    return ";".join(f"{FAUST_SCHEME}://{h}" for h in hosts)


def faust_credentials(k: KafkaSettings) -> Any:
    """Faust's broker_credentials (None for PLAINTEXT)."""
    import faust

    ctx = ssl_context(k)
    if k.uses_sasl:
        user, password = _sasl_credentials(k)
        # SASLCredentials picks SASL_SSL itself when given an ssl_context.
        return faust.SASLCredentials(
            username=user, password=password, mechanism=k.sasl_mechanism, ssl_context=ctx
        )
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


def faust_app_kwargs(k: KafkaSettings) -> dict[str, Any]:
    """The broker options of faust.App: where, how to authenticate, acks=all (idempotence comes
    with the transport)."""
    return {
        "broker": faust_broker_url(k.bootstrap_servers),
        "broker_credentials": faust_credentials(k),
        "producer_acks": -1,
    }


def _register_faust_transport() -> None:
    # Faust picks its transport by URL scheme from a registry of "module:Class" names.
    from faust.transport import drivers

    drivers.TRANSPORTS.aliases.setdefault(FAUST_SCHEME, "radtriage.faust_transport:Transport")


def describe(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The kwargs with the password masked: for logs and error messages."""
    return {key: ("***" if "password" in key else value) for key, value in kwargs.items()}


class _AuthFailures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "AuthenticationFailed" in text or "AuthorizationFailed" in text:
            self.last = text


@contextlib.contextmanager
def authentication_failures() -> Iterator[_AuthFailures]:
    """Collect kafka-python's authentication failures while connecting.

    kafka-python retries a refused SASL login until its bootstrap timeout and then raises
    only "Unable to bootstrap"; the reason (wrong password, unknown user) is only logged.
    `watch.last` has it, so the caller's error can say so."""
    handler = _AuthFailures()
    logger = logging.getLogger("kafka")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def auth_reason(text: str) -> str:
    """The readable part of a logged SASL failure (e.g. "Authentication failed ... invalid credentials")."""
    marker = "Authentication failed"
    return text[text.index(marker) :].split(" (backoff")[0] if marker in text else text
