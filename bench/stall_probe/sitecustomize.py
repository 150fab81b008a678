"""Where a worker's event loop is late, and why: a diagnostic loaded into `radtriage worker`
through PYTHONPATH (Python imports `sitecustomize` at start), for a bench run.

    RADTRIAGE_STALL_PROBE=/tmp/probe PYTHONPATH=bench/stall_probe:$PWD python -m bench.delivery ...

Writes /tmp/probe/stalls-<pid>.jsonl, one JSON object a line, wall-clock times (the
benches' clock):
- {"lag": ms, "at": t}: the loop ran a 5 ms heartbeat `ms` late (>= 20 ms): the loop was
  busy in a callback, or waiting for the GIL (a thread holding it), or stopped by a GC;
- {"gc": gen, "ms": ms, "at": t}: a garbage collection of `ms` (>= 5 ms);
- {"busy": thread, "ms": ms, "at": t, "stacks": [...]}: a thread running Python code (its
  top frame not a wait) for `ms` (>= 20 ms) straight, sampled every 2 ms, with its most
  frequent stacks: who held the GIL while the loop was late;
- {"admit": alert_id, "alerted_at": t0, "at": t} and {"post": alert_id, "alerted_at": t0,
  "at": t, "end": t2}: the notify stage admitting an alert, and its webhook POST.
Only in the worker process (argv names `worker`) and only with the variable set. The
sampler costs a little GIL time itself; it is for finding a cause, not for figures.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
import sys
import threading
import time
from typing import Any

_DIR = os.environ.get("RADTRIAGE_STALL_PROBE", "")
_WAITS = {
    "select",
    "poll",
    "wait",
    "_wait_for_tstate_lock",
    "acquire",
    "sleep",
    "recv",
    "recv_into",
    "accept",
    "_worker",
    "get",
    "read",
    "readline",
    "epoll",
    "run_forever",
    "_run_once",
    "result",
}


def _emit(fh: Any, lock: threading.Lock, record: dict[str, Any]) -> None:
    with lock:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def _stack(frame: Any, depth: int = 8) -> str:
    parts = []
    while frame is not None and len(parts) < depth:
        code = frame.f_code
        parts.append(f"{os.path.basename(code.co_filename)}:{code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return " < ".join(parts)


def _trace_notify(fh: Any, lock: threading.Lock) -> None:
    """The notify stage's steps for each alert, on the same clock: when the stream admitted
    it and when its webhook POST started and ended (the alert's `alerted_at` with them)."""
    channels = sys.modules.get("processors.notify.channels")
    notify = sys.modules.get("streams.stages.notify")
    if channels is None or notify is None or getattr(notify, "_probed", False):
        return
    notify._probed = True
    post = channels.post_webhook
    admit = notify.Notifier.admit

    async def traced_post(session: Any, target: Any, notice: Any, timeout_s: float) -> None:
        start = time.time()
        try:
            await post(session, target, notice, timeout_s)
        finally:
            _emit(
                fh,
                lock,
                {
                    "post": notice.alert.alert_id,
                    "alerted_at": notice.alert.alerted_at.timestamp(),
                    "at": start,
                    "end": time.time(),
                },
            )

    async def traced_admit(self: Any, alert: Any) -> None:
        _emit(
            fh, lock, {"admit": alert.alert_id, "alerted_at": alert.alerted_at.timestamp(), "at": time.time()}
        )
        await admit(self, alert)

    channels.post_webhook = traced_post
    notify.Notifier.admit = traced_admit


def _start() -> None:
    os.makedirs(_DIR, exist_ok=True)
    fh = open(os.path.join(_DIR, f"stalls-{os.getpid()}.jsonl"), "a")
    lock = threading.Lock()
    gc_started: dict[int, float] = {}

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        gen = int(info.get("generation", -1))
        if phase == "start":
            gc_started[gen] = time.perf_counter()
        elif gen in gc_started:
            ms = (time.perf_counter() - gc_started.pop(gen)) * 1000
            if ms >= 5:
                _emit(
                    fh,
                    lock,
                    {"gc": gen, "ms": round(ms, 1), "at": time.time(), "collected": info.get("collected")},
                )

    gc.callbacks.append(on_gc)

    def sampler() -> None:
        me = threading.get_ident()
        runs: dict[int, tuple[float, collections.Counter[str]]] = {}
        while True:
            time.sleep(0.002)
            now = time.time()
            names = {t.ident: t.name for t in threading.enumerate()}
            frames = sys._current_frames()
            for ident, frame in frames.items():
                if ident == me:
                    continue
                busy = frame.f_code.co_name not in _WAITS
                if busy:
                    start, stacks = runs.get(ident, (now, collections.Counter()))
                    stacks[_stack(frame)] += 1
                    runs[ident] = (start, stacks)
                elif ident in runs:
                    start, stacks = runs.pop(ident)
                    ms = (now - start) * 1000
                    if ms >= 20:
                        _emit(
                            fh,
                            lock,
                            {
                                "busy": names.get(ident, str(ident)),
                                "ms": round(ms, 1),
                                "at": start,
                                "stacks": stacks.most_common(4),
                            },
                        )

    threading.Thread(target=sampler, name="stall-probe", daemon=True).start()

    run_forever = asyncio.BaseEventLoop.run_forever

    def probed(self: asyncio.BaseEventLoop) -> None:
        period = 0.005

        def beat(due: float) -> None:
            late = (time.monotonic() - due) * 1000
            if late >= 20:
                _emit(fh, lock, {"lag": round(late, 1), "at": time.time() - late / 1000})
            self.call_later(period, beat, time.monotonic() + period)

        self.call_soon(beat, time.monotonic())
        _trace_notify(fh, lock)
        run_forever(self)

    asyncio.BaseEventLoop.run_forever = probed  # type: ignore[method-assign]


if _DIR and any(a == "worker" for a in sys.argv):
    _start()
