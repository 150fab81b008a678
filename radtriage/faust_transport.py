"""Faust's aiokafka transport with an idempotent producer (acks=all, enable_idempotence).

faust-streaming sets `enable_idempotence` only for transactional producers (exactly_once,
which radtriage does not use: see streams/published_ledger.py). An idempotent producer keeps a
retried batch from being written twice after a leader change, which the 3-broker cluster
makes routine. Registered under the URL scheme `radtriage-kafka://` by
radtriage.kafka_clients.faust_broker_url.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import ProducerT


class IdempotentProducer(faust_aiokafka.Producer):
    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class Transport(faust_aiokafka.Transport):
    Producer: ClassVar[type[ProducerT]] = IdempotentProducer
