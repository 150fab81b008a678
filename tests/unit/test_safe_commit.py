"""The commit rule of radtriage's Faust consumer (radtriage/faust_transport.py): never past a
request still in flight, never over a message a stream skipped, never before the table
writes made so far are in Kafka.

Faust's own rule commits `committed + 1`'s run with `committed` still being processed, and
any run at all when no offset is committed yet; a worker SIGKILLed after such a commit
loses the request (the 3-broker fault test once waited forever for its report).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import faust
import pytest
from aiokafka.errors import KafkaTimeoutError
from faust.exceptions import ProducerSendError
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from faust.types.tuples import FutureMessage

from radtriage.faust_transport import AfterAJump, SafeCommitConsumer, after_a_jump, committable_offset
from radtriage.kafka_clients import faust_app_kwargs
from radtriage.settings import KafkaSettings

TOPIC = "triage.requests.stat"
PART = TP(TOPIC, 0)


@pytest.mark.parametrize(
    ("acked", "committed", "in_flight", "expected"),
    [
        ([100, 101, 102], 100, None, (103, 3)),  # the ordinary case
        ([101], 100, 100, None),  # Faust commits 102 here: 100 is lost on a crash
        ([101], 100, None, None),  # 100 not even acked: a hole at the head
        ([0, 1, 2], None, None, (3, 3)),  # nothing committed yet, nothing in flight
        ([1], None, 0, None),  # nothing committed yet, 0 in flight (Faust commits 2)
        ([5, 6, 8, 9], 5, None, (7, 2)),  # up to the first hole
        ([5, 6, 7, 8], 5, 7, (7, 2)),  # up to the oldest request in flight
        ([3, 4, 5, 6], 5, None, (7, 4)),  # stale acks below the committed offset go
        ([3, 4], 5, None, (5, 2)),  # only stale acks: consumed, nothing new to commit
    ],
)
def test_committable_offset(
    acked: list[int], committed: int | None, in_flight: int | None, expected: tuple[int, int] | None
) -> None:
    assert committable_offset(acked, committed, in_flight) == expected


@pytest.fixture
def consumer() -> SafeCommitConsumer:
    # A real Faust app on radtriage's transport, never started: no broker is contacted.
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    app = faust.App("radtriage-test-commit", **faust_app_kwargs(kafka))
    c = app.consumer
    assert isinstance(c, SafeCommitConsumer)
    app.topics.acking_topics.add(TOPIC)
    app.consumer_generation_id = 7
    app.flow_control.resume()
    return c


def _delivered(c: SafeCommitConsumer, offset: int, generation: int = 7) -> Message:
    m = Message(TOPIC, 0, offset, 0.0, 0, [], b"k", b"v", None, tp=PART, generation_id=generation)
    c.track_message(m)
    return m


def test_out_of_order_acks_commit_only_below_the_oldest_in_flight(consumer: SafeCommitConsumer) -> None:
    consumer._committed_offset[PART] = 100
    slow, fast = _delivered(consumer, 100), _delivered(consumer, 101)
    assert consumer.ack(fast)
    assert consumer._new_offset(PART) is None
    assert consumer.ack(slow)
    assert consumer._new_offset(PART) == 102


def test_a_fresh_partition_with_a_request_in_flight_commits_nothing(consumer: SafeCommitConsumer) -> None:
    slow, fast = _delivered(consumer, 0), _delivered(consumer, 1)
    consumer.ack(fast)
    assert consumer._new_offset(PART) is None
    consumer.ack(slow)
    assert consumer._new_offset(PART) == 2


def test_a_message_skipped_after_a_rebalance_does_not_count(consumer: SafeCommitConsumer) -> None:
    consumer._committed_offset[PART] = 100
    prefetched = _delivered(consumer, 100, generation=6)
    assert not consumer.ack(prefetched)
    assert prefetched.acked and prefetched not in consumer._unacked_messages
    assert consumer._new_offset(PART) is None
    again = _delivered(consumer, 100)
    assert consumer.ack(again)
    assert consumer._new_offset(PART) == 101


def test_a_message_acked_while_flow_is_stopped_does_not_count(consumer: SafeCommitConsumer) -> None:
    consumer._committed_offset[PART] = 10
    m = _delivered(consumer, 10)
    consumer.app.flow_control.suspend()
    assert not consumer.ack(m)
    assert consumer._new_offset(PART) is None


@pytest.mark.parametrize(
    ("expected", "offset", "log_start", "lost", "reread_from"),
    [
        (379, 433, 0, None, 379),  # records dropped around a rebalance: read them again
        (379, 433, None, None, 379),  # the broker did not say: read again, never lose
        (100, 140, 140, (100, 140), None),  # retention deleted 100-139: nothing to wait for
        (100, 140, 120, (100, 120), 120),  # 120-139 still exist: read from there
    ],
)
def test_after_a_jump(
    expected: int, offset: int, log_start: int | None, lost: tuple[int, int] | None, reread_from: int | None
) -> None:
    assert after_a_jump(expected, offset, log_start) == AfterAJump(lost=lost, reread_from=reread_from)


class _Batches:
    """Stands in for the broker side of Consumer.getmany: one list of offsets per batch,
    and the seeks the consumer asks for."""

    def __init__(
        self, consumer: SafeCommitConsumer, batches: list[list[int]], log_start: int, tp: TP = PART
    ) -> None:
        self.batches, self.sought, self.tp = batches, list[int](), tp
        self.log_start = log_start
        self.c = consumer

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:  # noqa: ASYNC109
        for offset in self.batches.pop(0):
            tp = self.tp
            yield tp, Message(tp.topic, 0, offset, 0.0, 0, [], b"k", b"v", None, tp=tp, generation_id=7)

    async def earliest_offsets(self, *tps: TP) -> dict[TP, int]:
        return {tp: self.log_start for tp in tps}

    async def seek(self, tp: TP, offset: int) -> None:
        self.sought.append(offset)


def _read(c: SafeCommitConsumer, broker: _Batches, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    monkeypatch.setattr(faust_aiokafka.Consumer, "getmany", lambda self, timeout: broker.getmany(timeout))
    monkeypatch.setattr(
        faust_aiokafka.Consumer, "earliest_offsets", lambda self, *tps: broker.earliest_offsets(*tps)
    )
    monkeypatch.setattr(faust_aiokafka.Consumer, "seek", lambda self, tp, offset: broker.seek(tp, offset))

    async def drain() -> list[int]:
        return [m.offset async for _, m in c.getmany(1.0)]

    return asyncio.run(drain())


def test_records_dropped_around_a_rebalance_are_read_again(
    consumer: SafeCommitConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer._next_offset[PART] = 379  # 379-432 were fetched and dropped; reading went on at 433
    broker = _Batches(consumer, [[433, 434, 435], [379, 380]], log_start=0)
    assert _read(consumer, broker, monkeypatch) == []  # nothing past the hole is delivered
    assert broker.sought == [379]
    assert _read(consumer, broker, monkeypatch) == [379, 380]
    assert consumer._next_offset[PART] == 381
    assert not consumer._gap[PART]  # nothing counted as done unread


def test_a_head_retention_deleted_is_not_waited_for(
    consumer: SafeCommitConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer._committed_offset[PART] = 100
    consumer._next_offset[PART] = 100
    broker = _Batches(consumer, [[140, 141]], log_start=140)
    assert _read(consumer, broker, monkeypatch) == [140, 141]
    assert broker.sought == []
    consumer.ack(_delivered(consumer, 140))
    consumer.ack(_delivered(consumer, 141))
    assert consumer._new_offset(PART) == 142


def test_in_order_reading_is_left_alone(
    consumer: SafeCommitConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer._next_offset[PART] = 10
    broker = _Batches(consumer, [[10, 11, 12]], log_start=0)
    assert _read(consumer, broker, monkeypatch) == [10, 11, 12]
    assert broker.sought == []


def test_a_gap_while_reading_stops_before_the_message_just_read(consumer: SafeCommitConsumer) -> None:
    consumer._committed_offset[PART] = 100
    consumer.ack(_delivered(consumer, 100))
    # Faust reports a jump from 100 to 105 as _add_gap(tp, 101, 105); 105 is the message
    # just read, not yet done, so only 101-104 are empty.
    asyncio.run(consumer._add_gap(PART, 101, 105))
    assert [(i.begin, i.end) for i in consumer._gap[PART]] == [(101, 105)]
    assert consumer._new_offset(PART) == 101
    consumer._committed_offset[PART] = 101  # what Consumer.commit records
    consumer.ack(_delivered(consumer, 105))
    assert consumer._new_offset(PART) == 106


def test_a_table_changelog_is_left_to_faust(
    consumer: SafeCommitConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Recovery seeks changelogs itself, and they are compacted: jumps are normal there.
    changelog = TP("radtriage-assembly-changelog", 0)
    consumer._next_offset[changelog] = 0
    broker = _Batches(consumer, [[2034, 2035]], log_start=0, tp=changelog)
    assert _read(consumer, broker, monkeypatch) == [2034, 2035]
    assert broker.sought == []


def _table_write(app: faust.App) -> FutureMessage:
    # What a Table's __setitem__ hands the producer: a buffered changelog record.
    fut = app.topic("radtriage-assembly-changelog").as_future_message(key=b"study", value=b"state")
    app.producer.send_soon(fut)
    return fut


def test_a_commit_waits_for_the_table_writes_before_it(consumer: SafeCommitConsumer) -> None:
    """Faust's flush stops waiting for its buffer after 0.1 s without a send; the commit
    then went out with the assembly's table write still in memory, and a worker killed next
    lost the study (the 3-broker fault test, one run in three)."""

    async def go() -> None:
        app = consumer.app
        write = _table_write(app)
        committing = asyncio.ensure_future(consumer._handle_attached({}))
        await asyncio.sleep(0.3)  # longer than Faust's 0.1 s
        assert not committing.done()
        write.set_result(None)  # Kafka acknowledged it
        await asyncio.wait_for(committing, 5.0)
        # Acknowledged writes are forgotten: the next commit does not wait for them.
        await asyncio.wait_for(consumer._handle_attached({}), 1.0)

    asyncio.run(go())


def test_a_failed_table_write_stops_every_later_commit(consumer: SafeCommitConsumer) -> None:
    async def go() -> None:
        write = _table_write(consumer.app)
        write.set_exception(KafkaTimeoutError())
        for _ in range(2):  # Faust crashes the worker on the first; never a commit past it
            with pytest.raises(ProducerSendError, match="table changelog write failed"):
                await consumer._handle_attached({})

    asyncio.run(go())


def test_a_record_skipped_after_the_recoverys_seek_is_read_again(
    consumer: SafeCommitConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The recovery sought to 100 and the fetcher read on while the flow was still stopped:
    # the stream skipped 103, of this generation, and nothing would read it again.
    consumer._next_offset[PART] = 103
    consumer.app.flow_control.suspend()
    assert not consumer.ack(_delivered(consumer, 104))
    assert not consumer.ack(_delivered(consumer, 103))
    consumer.app.flow_control.resume()
    broker = _Batches(consumer, [[105, 106], [103, 104, 105]], log_start=0)
    assert _read(consumer, broker, monkeypatch) == []
    assert broker.sought == [103]
    assert _read(consumer, broker, monkeypatch) == [103, 104, 105]
    assert broker.sought == [103]  # once


def test_a_skip_is_left_to_the_rebalance_while_the_flow_is_stopped(
    consumer: SafeCommitConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer.app.flow_control.suspend()
    consumer.ack(_delivered(consumer, 50))
    assert consumer._owed(PART, 60) is None  # the recovery's seek may still come
    consumer.app.flow_control.resume()

    async def seek(self: SafeCommitConsumer, tp: TP, offset: int) -> None:
        pass

    monkeypatch.setattr(faust_aiokafka.Consumer, "seek", seek)
    asyncio.run(consumer.seek(PART, 40))  # it came, and reads 50 again
    assert consumer._owed(PART, 60) is None


def test_a_skip_noted_before_the_recoverys_seek_is_left_to_it(
    consumer: SafeCommitConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer.app.flow_control.suspend()
    consumer.ack(_delivered(consumer, 50))

    async def seek_to_committed(self: SafeCommitConsumer) -> dict[TP, int]:
        return {PART: 45}

    monkeypatch.setattr(faust_aiokafka.Consumer, "seek_to_committed", seek_to_committed)
    asyncio.run(consumer.perform_seek())
    consumer.app.flow_control.resume()
    assert consumer._owed(PART, 60) is None


def test_an_old_generations_message_is_left_to_the_rebalances_seek(consumer: SafeCommitConsumer) -> None:
    assert not consumer.ack(_delivered(consumer, 70, generation=6))
    assert consumer._owed(PART, 80) is None
