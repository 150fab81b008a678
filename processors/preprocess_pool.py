"""Series loading and preprocessing in worker processes, one pool per lane, routine at lower CPU priority.

Measured by `bench/lanes.py` (bench/RESULTS.md): with preprocessing in threads of the
Faust worker, a stat study's preprocessing ran up to 2-3x slower while a routine one
ran beside it — the lanes shared one process's GIL and event loop, so "separate lanes"
stopped at the queue. Here each lane has its own process pool, and the urgent and
routine pools run at a higher `nice` value, so when the cores are busy the kernel
gives them to stat work first; the event loop only waits on a future.

Every lane's pool is started (torch and MONAI imported there) before the worker says
ready, so the first study does not pay for it. The worker process itself never imports
them: only the pool processes do (`_prepare`).

Memory (issue 16): two 240-slice head CTs preprocessed at once OOM-killed the stat pool.
Every request is admitted against one byte budget shared by all lanes
(`streams.preprocess_memory_budget_bytes`): its estimated working memory — the series'
decoded pixel bytes times what the loader and preprocessing were measured to need per
pixel byte — must fit beside what is running, or it waits (on the event loop, not in a
pool process). Stat requests are admitted before urgent, urgent before routine; a request
larger than the whole budget runs alone, so nothing waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import multiprocessing
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models import registry
from processors.child_process import exit_with_parent
from radtriage.settings import LANES

if TYPE_CHECKING:  # the stream worker must not import torch/MONAI: model_inputs does
    from processors.model_inputs import ModelGeometry

log = logging.getLogger(__name__)

# Admission order when several lanes wait for memory (fastest first); a lane not named comes last.
LANE_ORDER = LANES
# What a series of a few MB still costs: the model's grid, its channels and the resize.
MIN_WORKING_BYTES = 96 * 1024 * 1024


def working_bytes_per_pixel_byte(model_name: str = "") -> float:
    """Peak RSS of a preprocessing process above its import baseline per byte of the series'
    decoded pixel data, as the model's spec states it (measured at scanner size by
    bench/preprocess.py, bench/RESULTS.md, and rounded up); for a model not measured (or not
    named), the largest factor of the registered models."""
    specs = registry.specs()
    spec = specs.get(model_name)
    if spec is not None and spec.working_bytes_per_pixel_byte is not None:
        return spec.working_bytes_per_pixel_byte
    return max((s.working_bytes_per_pixel_byte or 0.0 for s in specs.values()), default=1.0)


def estimated_working_bytes(pixel_bytes: int, model_name: str = "") -> int:
    """The working memory one load + preprocessing of a series of `pixel_bytes` is admitted for."""
    factor = working_bytes_per_pixel_byte(model_name)
    return max(MIN_WORKING_BYTES, math.ceil(factor * max(pixel_bytes, 0)))


def pixel_bytes_from_header(paths: Sequence[Path]) -> int:
    """A series' decoded pixel bytes from its first file's header (rows x columns x bytes per
    sample x samples x frames, times the number of files): for a request that does not
    carry them. 0 when the header cannot be read (the load will say why)."""
    if not paths:
        return 0
    from pydicom import dcmread

    try:
        ds = dcmread(paths[0], stop_before_pixels=True)
        per_frame = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
        per_frame *= max(int(ds.get("BitsAllocated", 16) or 16), 8) // 8
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:  # anything unreadable: the loader reports it properly
        return 0
    return per_frame * frames * len(paths)


class MemoryAdmission:
    """A byte budget shared by every lane: `reserve` waits until a request's bytes fit.

    Waiters are admitted strictly in (lane rank, arrival) order: the first in that order
    that does not fit holds the ones behind it, so a large stat series is not starved by a
    stream of small routine ones slipping past. A request over the whole budget counts as
    the whole budget: it runs when nothing else does. Pure asyncio; no processes.
    """

    def __init__(self, budget_bytes: int, lane_order: Sequence[str] = LANE_ORDER) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"the memory budget must be positive, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.in_use = 0
        self._rank = {lane: i for i, lane in enumerate(lane_order)}
        self._order = itertools.count()
        self._waiting: list[tuple[int, int, int, asyncio.Future[None]]] = []

    @property
    def waiting(self) -> int:
        return sum(1 for *_, f in self._waiting if not f.done())

    def cost(self, estimated_bytes: int) -> int:
        return min(max(int(estimated_bytes), 1), self.budget_bytes)

    async def acquire(self, lane: str, estimated_bytes: int) -> int:
        """Wait until `estimated_bytes` fit; returns the bytes held (give them to `release`)."""
        cost = self.cost(estimated_bytes)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(
            self._waiting, (self._rank.get(lane, len(self._rank)), next(self._order), cost, future)
        )
        self._admit()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(cost)  # admitted just as the waiter was cancelled: give it back
            else:
                future.cancel()
                self._admit()  # the cancelled one may have held others back
            raise
        return cost

    def release(self, cost: int) -> None:
        self.in_use -= cost
        if self.in_use < 0:
            raise RuntimeError("released more memory than was reserved")
        self._admit()

    @contextlib.asynccontextmanager
    async def reserve(self, lane: str, estimated_bytes: int) -> AsyncIterator[int]:
        cost = await self.acquire(lane, estimated_bytes)
        try:
            yield cost
        finally:
            self.release(cost)

    def _admit(self) -> None:
        while self._waiting:
            _, _, cost, future = self._waiting[0]
            if future.done():  # cancelled while waiting
                heapq.heappop(self._waiting)
                continue
            if self.in_use + cost > self.budget_bytes:
                return
            heapq.heappop(self._waiting)
            self.in_use += cost
            future.set_result(None)


def _default_budget() -> int:
    from radtriage.settings import StreamSettings

    return int(StreamSettings.model_fields["preprocess_memory_budget_bytes"].default)


def _init_process(niceness: int) -> None:
    exit_with_parent()
    if niceness:
        os.nice(niceness)
    # One thread each: parallelism comes from the pool, and a routine process must not
    # spread over every core with its own thread pool.
    import torch

    torch.set_num_threads(1)
    import processors.model_inputs  # noqa: F401  # import torch/MONAI/pydicom before the first study


def _ready() -> bool:
    return True


def _prepare(model_name: str, paths: Sequence[str]) -> tuple[np.ndarray, ModelGeometry]:
    # Runs in the pool process, which imported model_inputs at start. Sending
    # `model_inputs.prepare_for_pool` itself made the *worker* import it (torch, MONAI)
    # on the first study, on its event loop: 4-10 s in which no stage ran, so the first
    # study after ready alerted in 9 s against 1 s for the next (bench/realistic_study.py).
    from processors.model_inputs import prepare_for_pool

    return prepare_for_pool(model_name, paths)


class LanePools:
    def __init__(
        self,
        concurrency: Mapping[str, int],
        niceness: Mapping[str, int],
        memory_budget_bytes: int | None = None,
    ) -> None:
        self._concurrency = dict(concurrency)
        self._niceness = dict(niceness)
        # None: the settings' default (streams.preprocess_memory_budget_bytes).
        self.memory = MemoryAdmission(memory_budget_bytes or _default_budget())
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
        self, lane: str, model_name: str, paths: Sequence[Path], pixel_bytes: int = 0
    ) -> tuple[np.ndarray, ModelGeometry]:
        """The model input and the model's geometry (None for a model that does not localise;
        processors/model_inputs.py), once the series' estimated working memory fits the
        shared budget. `pixel_bytes`: the series' decoded pixel bytes
        (TriageRequest.pixel_bytes); 0 = unknown, read from the first file's header."""
        loop = asyncio.get_running_loop()
        if pixel_bytes <= 0:
            pixel_bytes = await loop.run_in_executor(None, pixel_bytes_from_header, list(paths))
        args = (model_name, [str(p) for p in paths])
        async with self.memory.reserve(lane, estimated_working_bytes(pixel_bytes, model_name)):
            try:
                return await loop.run_in_executor(self._pool(lane), _prepare, *args)
            except BrokenProcessPool:
                # A pool process died (OOM, a kill): a fresh pool, and this study tried once more.
                log.warning("preprocessing pool for the %s lane broke; starting a new one", lane)
                self._pools.pop(lane, None)
                return await loop.run_in_executor(self._pool(lane), _prepare, *args)

    def shutdown(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._pools.clear()
