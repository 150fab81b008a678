"""KafkaSettings -> each client library's keyword arguments (radtriage/kafka_clients.py)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import faust
import pytest
from aiokafka import AIOKafkaConsumer
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from radtriage.kafka_clients import (
    KafkaConfigError,
    aiokafka_kwargs,
    aiokafka_producer_kwargs,
    describe,
    faust_app_kwargs,
    kafka_python_kwargs,
    kafka_python_producer_kwargs,
)
from radtriage.settings import KafkaSettings, Settings


def sasl_ssl(**extra: object) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers="b1:9092,b2:9092",
        security_protocol="SASL_SSL",
        sasl_username="radtriage-dicom",
        sasl_password="s3cret",  # type: ignore[arg-type]
        **extra,  # type: ignore[arg-type]
    )


def test_plaintext_default_is_todays_behaviour() -> None:
    k = KafkaSettings()
    assert kafka_python_kwargs(k) == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}
    assert aiokafka_kwargs(k) == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}
    app = faust_app_kwargs(k)
    assert app["broker_credentials"] is None and app["producer_acks"] == -1


def test_sasl_ssl_for_kafka_python_and_aiokafka() -> None:
    for kwargs in (kafka_python_kwargs(sasl_ssl()), aiokafka_kwargs(sasl_ssl())):
        assert kwargs["security_protocol"] == "SASL_SSL"
        assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
        assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("radtriage-dicom", "s3cret")
        ctx = kwargs["ssl_context"]
        # Brokers are verified: certificate and hostname.
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_the_libraries_accept_every_option_we_pass() -> None:
    # Constructing without a reachable broker fails on connection, never on an unknown option.
    for make in (KafkaConsumer, KafkaAdminClient, KafkaProducer):
        kwargs = (
            kafka_python_producer_kwargs(sasl_ssl())
            if make is KafkaProducer
            else kafka_python_kwargs(sasl_ssl())
        )
        kwargs["bootstrap_servers"] = "127.0.0.1:1"
        with pytest.raises(Exception) as err:
            make(**kwargs, bootstrap_timeout_ms=200, request_timeout_ms=1000)
        assert "unrecognized" not in str(err.value).lower() and not isinstance(err.value, TypeError)


def test_aiokafka_accepts_our_options() -> None:
    async def build() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(**aiokafka_kwargs(sasl_ssl()))

    consumer = asyncio.run(build())
    assert consumer._client._security_protocol == "SASL_SSL"
    assert consumer._client._sasl_mechanism == "SCRAM-SHA-512"


def test_producers_are_acks_all_and_idempotent() -> None:
    for kwargs in (kafka_python_producer_kwargs(KafkaSettings()), aiokafka_producer_kwargs(sasl_ssl())):
        assert kwargs["acks"] == "all" and kwargs["enable_idempotence"] is True


def test_faust_gets_scram_credentials_over_tls_and_an_idempotent_producer() -> None:
    kwargs = faust_app_kwargs(sasl_ssl())
    creds = kwargs["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.mechanism.value == "SCRAM-SHA-512" and creds.protocol.value == "SASL_SSL"
    assert (creds.username, creds.password) == ("radtriage-dicom", "s3cret")
    app = faust.App("unit-kafka-clients", **kwargs)
    assert [str(u) for u in app.conf.broker] == ["radtriage-kafka://b1:9092", "radtriage-kafka://b2:9092"]
    producer = app.producer
    settings = {**producer._settings_default(), **producer._settings_auth(), **producer._settings_extra()}
    assert settings["enable_idempotence"] is True and settings["acks"] in ("all", -1)
    assert settings["security_protocol"] == "SASL_SSL" and settings["sasl_mechanism"] == "SCRAM-SHA-512"


def test_faust_tls_without_sasl() -> None:
    creds = faust_app_kwargs(KafkaSettings(security_protocol="SSL"))["broker_credentials"]
    assert isinstance(creds, faust.SSLCredentials)


def test_password_from_a_file_wins(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-file\n")
    kwargs = kafka_python_kwargs(sasl_ssl(sasl_password_file=secret))
    assert kwargs["sasl_plain_password"] == "from-file"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (KafkaSettings(security_protocol="SASL_SSL", sasl_password="x"), "sasl_username"),  # type: ignore[arg-type]
        (KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_username="u"), "sasl_password"),
        (
            KafkaSettings(
                security_protocol="SASL_SSL", sasl_username="u", sasl_password_file=Path("/nonexistent")
            ),
            "sasl_password_file",
        ),
        (
            KafkaSettings(security_protocol="SSL", ssl_cafile=Path("/nonexistent/ca.pem")),
            "TLS files unusable",
        ),
    ],
)
def test_unusable_settings_fail_clearly(settings: KafkaSettings, message: str) -> None:
    with pytest.raises(KafkaConfigError, match=message):
        kafka_python_kwargs(settings)


def test_the_password_is_never_dumped_except_for_children() -> None:
    s = Settings(kafka=sasl_ssl())
    assert "s3cret" not in s.model_dump_json() and "s3cret" not in repr(s) and "s3cret" not in str(s.kafka)
    child = Settings.model_validate_json(s.model_dump_json(context={"reveal_secrets": True}))
    assert child.kafka.password() == "s3cret"
    assert describe(kafka_python_kwargs(s.kafka))["sasl_plain_password"] == "***"


def test_the_k8s_env_names_are_real_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RADTRIAGE_CONFIG", str(tmp_path / "none.yaml"))
    env = {
        "RADTRIAGE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "RADTRIAGE_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "RADTRIAGE_KAFKA__SASL_USERNAME": "radtriage-worker",
        "RADTRIAGE_KAFKA__SASL_PASSWORD": "pw",
        "RADTRIAGE_KAFKA__SSL_CAFILE": "/etc/kafka-ca/ca.crt",
        "RADTRIAGE_KAFKA__MIN_INSYNC_REPLICAS": "2",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    k = Settings().kafka
    assert (k.security_protocol, k.sasl_username, k.password(), str(k.ssl_cafile)) == (
        "SASL_SSL",
        "radtriage-worker",
        "pw",
        "/etc/kafka-ca/ca.crt",
    )
    assert k.min_insync_replicas == 2


def test_kafka_python_checksums_records_in_c() -> None:
    # Without the crc32c package kafka-python silently falls back to its pure-Python CRC32C,
    # a few hundred microseconds per record on every connector's answer path.
    from kafka.record import util

    assert util.crc32c_c is not None
    assert util.calc_crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
