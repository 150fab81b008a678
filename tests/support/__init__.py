"""Helpers shared by the test trees (unit, integration, e2e, cluster).

- `net`: free ports, waiting for a port to accept connections;
- `wait`: polling a condition until a deadline;
- `kafka`: reading records back from topics (`Record`, `read_topic`, `TopicReader`, `Tail`);
- `settings`: Settings isolated per test (its own home and uniquely named topics);
- `loop`: an asyncio event loop running in a thread of its own, for synchronous tests;
- `http`: the HTTP server (`start_http`) in such a loop;
- `dicom`: dcmtk's tools (storescu) and the DICOM listener (`start_scp`) on its own topic.

Fixtures built on them are in the conftest.py files; what only one tree needs stays in its
harness.py (integration: the worker process; e2e: `radtriage up`; cluster: the 3-node cluster).
"""
