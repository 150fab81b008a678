"""What every radtriage pool process does first: leave with the worker that started it."""

from __future__ import annotations

import multiprocessing
import os
import threading


def exit_with_parent() -> None:
    """A SIGKILLed worker cannot shut its pools down, and a spawned child holds both ends of
    its call queue, so it would never see EOF: it watches its parent and leaves with it."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
