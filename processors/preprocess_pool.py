"""Series loading and preprocessing in worker processes, one pool per lane, routine at lower CPU priority.

Measured by `bench/lanes.py` (bench/RESULTS.md): with preprocessing in threads of the
Faust worker, a stat study's preprocessing ran up to 2-3x slower while a routine one
ran beside it — the lanes shared one process's GIL and event loop, so "separate lanes"
stopped at the queue. Here each lane has its own process pool, and the urgent and
routine pools run at a higher `nice` value, so when the cores are busy the kernel
gives them to stat work first; the event loop only waits on a future.

The stat pool is started (torch and MONAI imported) when the worker starts, so the
first stat study does not pay for it; the other lanes' pools start on first use.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the stream worker must not import torch/MONAI: model_inputs does
    from processors.model_inputs import ModelGeometry

log = logging.getLogger(__name__)


def _exit_with_parent() -> None:
    """A SIGKILLed worker cannot shut its pool down, and a spawned child holds both ends of
    its call queue, so it would never see EOF: it watches its parent and leaves with it."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_process(niceness: int) -> None:
    _exit_with_parent()
    if niceness:
        os.nice(niceness)
    # One thread each: parallelism comes from the pool, and a routine process must not
    # spread over every core with its own thread pool.
    import torch

    torch.set_num_threads(1)
    import processors.model_inputs  # noqa: F401  # import torch/MONAI/pydicom before the first study


def _ready() -> bool:
    return True


class LanePools:
    def __init__(self, concurrency: Mapping[str, int], niceness: Mapping[str, int]) -> None:
        self._concurrency = dict(concurrency)
        self._niceness = dict(niceness)
        self._pools: dict[str, ProcessPoolExecutor] = {}
        # "spawn": forking a process that runs an event loop, Kafka clients and threads is unsafe.
        self._context = multiprocessing.get_context("spawn")

    def _pool(self, lane: str) -> ProcessPoolExecutor:
        pool = self._pools.get(lane)
        if pool is None:
            pool = ProcessPoolExecutor(
                max_workers=max(1, self._concurrency.get(lane, 1)),
                mp_context=self._context,
                initializer=_init_process,
                initargs=(self._niceness.get(lane, 0),),
            )
            self._pools[lane] = pool
        return pool

    async def warm(self, lane: str) -> None:
        """Start every process of a lane's pool now."""
        loop = asyncio.get_running_loop()
        pool = self._pool(lane)
        await asyncio.gather(
            *(loop.run_in_executor(pool, _ready) for _ in range(self._concurrency.get(lane, 1)))
        )
        log.info("preprocessing pool for the %s lane is ready", lane)

    async def prepare(
        self, lane: str, model_name: str, paths: Sequence[Path]
    ) -> tuple[np.ndarray, ModelGeometry]:
        """The model input and the model's geometry (None for a model that does not localise;
        processors/model_inputs.py)."""
        from processors.model_inputs import prepare_for_pool

        loop = asyncio.get_running_loop()
        args = (model_name, [str(p) for p in paths])
        try:
            return await loop.run_in_executor(self._pool(lane), prepare_for_pool, *args)
        except BrokenProcessPool:
            # A pool process died (OOM, a kill): a fresh pool, and this study tried once more.
            log.warning("preprocessing pool for the %s lane broke; starting a new one", lane)
            self._pools.pop(lane, None)
            return await loop.run_in_executor(self._pool(lane), prepare_for_pool, *args)

    def shutdown(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._pools.clear()
