"""The webhook receiver of tests/support/notify_peers.py in a process of its own, for the
benchmarks: a hospital's receiver is not in the process that sends the studies, polls the
FHIR server and reads Kafka, and a receipt time taken there waits for that process's GIL
(up to the 5 ms switch interval each time the thread wakes, more behind a C call that holds
it). Same checks (HMAC signature, replay window, Idempotency-Key), same `Received` records,
read back from the JSON lines the child writes.

    python -m tests.support.webhook_process --secret S --out receipts.jsonl   # prints its port
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.notify_peers import Received, webhook_receiver

POLL_S = 0.02


class WebhookProcess:
    """The parent's view: `received`, `duplicates` and `refused` as the in-process receiver's."""

    def __init__(self, port: int, out: Path) -> None:
        self.port = port
        self.out = out

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _lines(self, kind: str) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        rows = [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]
        return [r for r in rows if r.get("kind") == kind]

    @property
    def received(self) -> list[Received]:
        return [
            Received(str(r["path"]), dict(r["body"]), str(r["key"]), float(r["at"]))
            for r in self._lines("received")
        ]

    @property
    def duplicates(self) -> list[str]:
        return [str(r["key"]) for r in self._lines("duplicate")]

    @property
    def refused(self) -> list[str]:
        return [str(r["reason"]) for r in self._lines("refused")]


@contextmanager
def webhook_receiver_process(secret: str, tmp: Path) -> Iterator[WebhookProcess]:
    out = tmp / "webhook-receipts.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.webhook_process", "--secret", secret, "--out", str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the webhook receiver did not start (it printed {line!r})")
        yield WebhookProcess(int(line), out)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(secret: str, out: Path) -> None:
    """Receive until terminated; append each new receipt, duplicate and refusal as a JSON line."""
    with webhook_receiver(secret) as receiver, out.open("a") as sink:
        print(receiver.port, flush=True)
        done = {"received": 0, "duplicate": 0, "refused": 0}
        while True:
            with receiver.lock:
                lists: dict[str, list[dict[str, Any]]] = {
                    "received": [
                        {"path": r.path, "body": r.body, "key": r.key, "at": r.at} for r in receiver.received
                    ],
                    "duplicate": [{"key": k} for k in receiver.duplicates],
                    "refused": [{"reason": x} for x in receiver.refused],
                }
            for kind, rows in lists.items():
                for row in rows[done[kind] :]:
                    sink.write(json.dumps({"kind": kind, **row}) + "\n")
                done[kind] = len(rows)
            sink.flush()
            time.sleep(POLL_S)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--secret", default="")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    try:
        serve(args.secret, args.out)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
