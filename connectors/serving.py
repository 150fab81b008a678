"""A listener's life as a command: serve until SIGTERM/SIGINT, then stop gracefully.

The HL7 MLLP listener and the HTTP intake run the same way under `radtriage hl7-listener`
and `radtriage http`: started, announced in the log, and on a signal stopped by their own
`stop`, which finishes what is in flight (a sender is answered, not cut off).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar


class Stoppable(Protocol):
    async def stop(self) -> None: ...


S = TypeVar("S", bound=Stoppable)


async def serve_until_signalled(
    start: Callable[[], Awaitable[S]],
    announce: Callable[[S], None],
    log: logging.Logger,
    *,
    stopping: str,
    stopped: str,
) -> None:
    """Start the server, `announce` it, wait for SIGTERM or SIGINT, then stop it, logging
    `stopping` and `stopped` on `log`. The handlers are in place before the start, so a
    signal that comes during it is not lost."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await start()
    announce(server)
    try:
        await stop.wait()
        log.info(stopping)
    finally:
        await server.stop()
    log.info(stopped)
