"""Helpers shared by the test trees (unit, integration, e2e, cluster).

- `net`: free loopback ports;
- `wait`: polling a condition until a deadline;
- `process`: `radtriage <command>` as a child process, and waiting until it is ready;
- `kafka`: reading records back from topics (`Record`, `read_topic`, `TopicReader`, `Tail`,
  `read_to_end`) and a broker of a test's own (`local_kafka`);
- `settings`: Settings isolated per test (its own home and uniquely named topics);
- `loop`: an asyncio event loop running in a thread of its own, for synchronous tests;
- `http`: the HTTP server (`start_http`) in such a loop, or `radtriage http` as a process;
- `dicom`: dcmtk's tools (storescu) and the DICOM listener (`start_scp`) on its own topic.

Fixtures built on them are in the conftest.py files; what only one tree needs stays in its
harness.py (integration: the worker process; e2e: `radtriage up`; cluster: the 3-node cluster).
"""
