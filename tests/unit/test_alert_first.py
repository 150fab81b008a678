"""Alerts first (streams/alert_first.py): a finding that alerts holds its other deliveries
until its alert was told, or another worker tells it, or the bound runs out."""

from __future__ import annotations

import asyncio

import pytest

from schemas.alerts import Alert, alert_id
from streams import alert_first as af
from streams.alert_first import AlertFirst
from streams.stages.escalate import alert_of
from tests.support.findings import finding

RULES = {"ich_classifier": True, "cxr_triage": False}
BLEED = finding("ICH", 0.93)
KEY = alert_id(BLEED.study_uid, "ICH")
ALERT = alert_of(BLEED, KEY, "")


def gates(wait_s: float = 0.2, owned: frozenset[int] = frozenset({0})) -> AlertFirst:
    gate = AlertFirst(RULES)
    gate.enable(wait_s, lambda partition: partition in owned)
    return gate


def test_only_a_finding_that_alerts_has_a_key() -> None:
    gate = gates()
    assert gate.key(BLEED) == KEY
    assert gate.key(finding("ICH", 0.1)) is None  # negative
    assert gate.key(finding("CXR_CRITICAL", 0.9)) is None  # its rule does not alert
    assert gate.key(finding("BIRADS", 0.9)) is None  # its rule is not in the table


def test_a_worker_that_does_not_notify_never_waits() -> None:
    async def check() -> None:
        gate = AlertFirst(RULES)  # never enabled: no notify stage here
        assert await asyncio.wait_for(gate.before_delivering(BLEED), 0.05) == "none"

    asyncio.run(check())


def test_a_finding_that_does_not_alert_never_waits() -> None:
    async def check() -> None:
        assert await asyncio.wait_for(gates().before_delivering(finding("ICH", 0.1)), 0.05) == "none"

    asyncio.run(check())


def test_the_delivery_goes_on_once_the_alert_was_told() -> None:
    async def check() -> None:
        gate = gates(wait_s=5.0)
        waiting = asyncio.ensure_future(gate.before_delivering(BLEED))
        await asyncio.sleep(0.02)
        assert not waiting.done()
        gate.release(KEY)
        assert await asyncio.wait_for(waiting, 0.5) == "told"

    asyncio.run(check())


def test_told_before_the_delivery_asks_means_no_wait() -> None:
    async def check() -> None:
        gate = gates(wait_s=5.0)
        gate.release(KEY)
        assert await asyncio.wait_for(gate.before_delivering(BLEED), 0.05) == "told"

    asyncio.run(check())


def test_an_alert_another_worker_tells_releases_at_once() -> None:
    async def check() -> None:
        gate = gates(wait_s=5.0, owned=frozenset({0}))
        gate.published(ALERT, 3)  # written to partition 3, which this worker's notify stage does not own
        assert await asyncio.wait_for(gate.before_delivering(BLEED), 0.05) == "told"

    asyncio.run(check())


def test_an_alert_this_worker_tells_is_waited_for() -> None:
    async def check() -> None:
        gate = gates(wait_s=0.1, owned=frozenset({3}))
        gate.published(ALERT, 3)
        assert await gate.before_delivering(BLEED) == "bound"

    asyncio.run(check())


def test_never_longer_than_the_bound() -> None:
    async def check() -> None:
        gate = gates(wait_s=0.05)
        assert await asyncio.wait_for(gate.before_delivering(BLEED), 5.0) == "bound"

    asyncio.run(check())


def test_gates_are_bounded_and_the_dropped_one_lets_its_waiter_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(af, "MAX_GATES", 3)

    async def check() -> None:
        gate = gates(wait_s=5.0)
        waiting = asyncio.ensure_future(gate.before_delivering(BLEED))
        await asyncio.sleep(0)
        for n in range(3):
            gate.release(f"other-{n}")
        assert await asyncio.wait_for(waiting, 0.5) == "told"
        assert len(gate._gates) == 3

    asyncio.run(check())


def test_an_alert_written_to_a_partition_this_worker_notifies_is_handed_over_at_once() -> None:
    handed: list[tuple[Alert, int]] = []
    gate = AlertFirst(RULES)
    gate.enable(0.2, lambda partition: partition in {0, 3}, lambda alert, p: handed.append((alert, p)))
    gate.published(ALERT, 3)
    assert handed == [(ALERT, 3)]
    gate.published(ALERT, 5)  # another worker's partition: its notify stage reads it from Kafka
    gate.published(ALERT, None)
    assert handed == [(ALERT, 3)]


def test_an_alert_is_handed_over_as_it_is_sent_once_not_again_when_acknowledged() -> None:
    handed: list[int] = []
    gate = AlertFirst(RULES)
    gate.enable(0.2, lambda partition: partition == 3, lambda alert, p: handed.append(p))
    assert gate.sending(ALERT, 3)
    gate.published(ALERT, 3, handed=True)
    assert handed == [3]
    # The partition not known before sending (no metadata yet): handed over at the ack.
    assert not gate.sending(ALERT, None)
    gate.published(ALERT, 3, handed=False)
    assert handed == [3, 3]
    # Another worker's partition: not handed over, and nothing here waits for it.
    assert not gate.sending(ALERT, 5)
    assert handed == [3, 3]


def test_an_alert_is_handed_over_even_when_nothing_waits_for_it() -> None:
    handed: list[int] = []
    gate = AlertFirst(RULES)
    gate.enable(0.0, lambda partition: True, lambda alert, p: handed.append(p))  # alerts first off
    gate.published(ALERT, 1)
    assert handed == [1]
