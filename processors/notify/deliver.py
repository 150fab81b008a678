"""Deliver one notification to one recipient: each channel in turn, retried with backoff.

A retryable failure (timeout, connection refused, 5xx, SMTP 4xx) is tried again after
`backoff_s`, doubled each time, up to `attempts` tries; a permanent one (4xx, SMTP 5xx)
or the last try moves on to the recipient's next channel. Every try is reported to
`on_attempt` (the notify stage puts it on `triage.audit`); None when no channel took it
(the stage dead-letters it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from processors.notify.channels import ChannelError
from schemas.oncall import Channel


@dataclass(frozen=True)
class Try:
    channel: str
    attempt: int
    error: str  # "" = delivered


Send = Callable[[Channel], Awaitable[None]]
Report = Callable[[Try], Awaitable[None]]


async def deliver(
    channels: Sequence[Channel],
    send: Send,
    on_attempt: Report,
    *,
    attempts: int,
    backoff_s: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> str | None:
    """The label of the channel that took it, or None when none did."""
    for channel in channels:
        pause = backoff_s
        for attempt in range(1, attempts + 1):
            try:
                await send(channel)
            except ChannelError as exc:
                await on_attempt(Try(channel.label, attempt, str(exc) or type(exc).__name__))
                if not exc.retryable:
                    break
                if attempt < attempts:
                    await sleep(pause)
                    pause *= 2
                continue
            await on_attempt(Try(channel.label, attempt, ""))
            return channel.label
    return None
