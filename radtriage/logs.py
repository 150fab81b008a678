"""Logging set-up shared by every radtriage process (rich on a terminal, plain otherwise)."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO", component: str = "radtriage") -> None:
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=True)
        fmt = f"[{component}] %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = f"%(asctime)s %(levelname)s [{component}] %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka and pynetdicom are chatty at INFO; their warnings still reach the operator.
    for noisy in ("aiokafka", "pynetdicom", "faust.transport", "mode"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kafka-python logs every refused connection at ERROR while a broker starts or
    # restarts; our own code reports what matters (PublishError, KafkaUnavailable).
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
