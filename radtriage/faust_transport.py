"""Faust's aiokafka transport with an idempotent producer (acks=all, enable_idempotence),
and a consumer that never commits past an event Faust dropped around a rebalance.

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
from faust.types import ConsumerT, Message, ProducerT


class IdempotentProducer(faust_aiokafka.Producer):
    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class NoSkippedAckConsumer(faust_aiokafka.Consumer):
    """Never acknowledges an event that Faust dropped unprocessed around a rebalance.

    faust-streaming's stream loop skips the events it prefetched before a rebalance (their
    `generation_id` is stale, or flow control is suspended while partitions are revoked)
    and then *acknowledges* them like processed ones (faust/streams.py, `skipped_value`),
    so their offsets are committed and no worker ever processes them: the scale-out
    benchmark lost 3 of 50 studies on one partition the first worker kept, right after two
    workers joined it (a suspected cause, read from faust's code: it did not recur in later
    runs, nor in tests/integration/test_rebalance_no_loss.py, which asserts the property).
    Refusing those acks leaves a gap at which the commit stops, and the new owner of the partition reads the
    events again from the committed offset. An event really processed by the old
    generation and acked late is then processed twice: at-least-once, which the published
    ledgers (streams/published_ledger.py) already make harmless.
    """

    def ack(self, message: Message) -> bool:
        stale = message.generation_id is not None and message.generation_id != self.app.consumer_generation_id
        if stale or not self.app.flow_control.is_active():
            return False
        return super().ack(message)


class Transport(faust_aiokafka.Transport):
    Producer: ClassVar[type[ProducerT]] = IdempotentProducer
    Consumer: ClassVar[type[ConsumerT]] = NoSkippedAckConsumer
