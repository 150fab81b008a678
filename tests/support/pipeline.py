"""The worker's Faust app built in a test, without running it (which agents and topics it has)."""

from __future__ import annotations

import asyncio

import faust

from radtriage.settings import Settings
from streams.agents import build_pipeline


def built_app(settings: Settings) -> faust.App:
    """The pipeline's app for `settings`, built on an event loop of its own: building it makes
    the lanes' gRPC aio client, which wants the thread's event loop, whatever earlier tests
    of the session left set or closed."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return build_pipeline(settings).app
    finally:
        asyncio.set_event_loop(None)
        loop.close()
