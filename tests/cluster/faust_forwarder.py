"""A tiny Faust app for the secure-cluster test: imaging.instances -> triage.findings.

Run as `python -m tests.cluster.faust_forwarder worker` with the worker role's
RADTRIAGE_KAFKA__* environment; it connects exactly as `radtriage worker` does
(radtriage.kafka_clients.faust_app_kwargs) under the app id radtriage (the worker's
consumer group and internal-topic prefix in the ACLs).
"""

from __future__ import annotations

from typing import Any

import faust

from radtriage.kafka_clients import faust_app_kwargs
from radtriage.settings import Settings

settings = Settings()
app = faust.App(
    settings.streams.app_id,
    **faust_app_kwargs(settings.kafka),
    store="memory://",
    web_enabled=False,
    consumer_auto_offset_reset="earliest",
    topic_replication_factor=settings.kafka.replication_factor,
    topic_partitions=settings.kafka.partitions,
)
source = app.topic(settings.topics.instances, value_serializer="raw", key_serializer="raw")
sink = app.topic(settings.topics.findings, value_serializer="raw", key_serializer="raw")


@app.agent(source)
async def forward(stream: Any) -> None:
    async for key, value in stream.items():
        await sink.send(key=key, value=b"forwarded:" + value)


if __name__ == "__main__":
    app.main()
