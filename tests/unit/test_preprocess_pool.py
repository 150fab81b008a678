"""Per-lane preprocessing processes: same tensor as in-process, errors come back as values,
a dead pool process is replaced, and a SIGKILLed owner leaves no pool process behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from models import registry
from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from processors.model_inputs import UnsupportedModelError, prepare_input
from processors.preprocess_pool import LanePools
from radtriage.settings import REPO_ROOT


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    ph = head_ct_phantom(np.random.default_rng(5), bleed=True)
    out = tmp_path_factory.mktemp("series")
    write_ct_series(ph.hu, ph.spacing_zyx, out)
    return sorted(out.glob("*.dcm"))


def _niceness(pid: int) -> int:
    # Field 19 of /proc/<pid>/stat; the command name (field 2) may hold spaces, so split after ')'.
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_pool_tensor_equals_in_process_and_lanes_run_at_their_niceness(series: list[Path]) -> None:
    pools = LanePools({"stat": 1, "routine": 1}, {"stat": 0, "routine": 7})

    async def run() -> tuple[np.ndarray, np.ndarray, int, int]:
        stat, _ = await pools.prepare("stat", "ich_classifier", series)
        routine, _ = await pools.prepare("routine", "ich_classifier", series)
        loop = asyncio.get_running_loop()
        stat_pid = await loop.run_in_executor(pools._pool("stat"), os.getpid)
        routine_pid = await loop.run_in_executor(pools._pool("routine"), os.getpid)
        return stat, routine, _niceness(stat_pid), _niceness(routine_pid)

    try:
        stat, routine, stat_nice, routine_nice = asyncio.run(run())
    finally:
        pools.shutdown()
    expected = prepare_input("ich_classifier", series).tensor
    np.testing.assert_array_equal(stat, expected)
    np.testing.assert_array_equal(routine, expected)
    assert routine_nice - stat_nice == 7


def test_errors_come_back_and_a_killed_pool_process_is_replaced(series: list[Path], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not dicom at all")
    pools = LanePools({"stat": 1}, {"stat": 0})

    async def run() -> np.ndarray:
        with pytest.raises(UnsupportedModelError):
            await pools.prepare("stat", "no_such_model", series)
        with pytest.raises(Exception, match=r"(?i)dicom|read|invalid|preamble"):
            await pools.prepare("stat", "ich_classifier", [garbage])
        loop = asyncio.get_running_loop()
        pid = await loop.run_in_executor(pools._pool("stat"), os.getpid)
        os.kill(pid, signal.SIGKILL)
        # The broken pool is noticed on the next call, which still returns a tensor.
        tensor, _ = await pools.prepare("stat", "ich_classifier", series)
        return tensor

    try:
        tensor = asyncio.run(run())
    finally:
        pools.shutdown()
    assert tensor.shape == prepare_input("ich_classifier", series).tensor.shape


def test_sigkilled_owner_leaves_no_pool_process() -> None:
    script = textwrap.dedent(
        """
        import asyncio, os, sys
        from processors.preprocess_pool import LanePools
        pools = LanePools({"stat": 2}, {"stat": 0})
        async def main():
            await pools.warm("stat")
            loop = asyncio.get_running_loop()
            pids = {await loop.run_in_executor(pools._pool("stat"), os.getpid) for _ in range(8)}
            print(" ".join(map(str, sorted(pids))), flush=True)
            await asyncio.sleep(3600)
        asyncio.run(main())
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert pids and all(Path(f"/proc/{p}").exists() for p in pids)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
        time.sleep(0.2)
    assert alive == [], f"pool processes outlived their SIGKILLed owner: {alive}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_the_pool_hands_back_the_series_geometry_with_the_tensor(series: list[Path]) -> None:
    """What maps the ICH model's localisation back to the series crosses the process boundary."""
    pools = LanePools({"stat": 1}, {"stat": 0})
    try:
        tensor, geometry = asyncio.run(pools.prepare("stat", "ich_classifier", series))
    finally:
        pools.shutdown()
    expected, volume, want = prepare_input("ich_classifier", series)
    np.testing.assert_array_equal(tensor, expected)
    assert geometry is not None and geometry == want
    assert len(geometry.positions_mm) == volume.hu.shape[0]


# --- admission by estimated memory (issue 16) --------------------------------------------------


async def _started(task: asyncio.Task[int]) -> bool:
    """Whether `task` got its bytes after the loop ran everything ready."""
    for _ in range(5):
        await asyncio.sleep(0)
    return task.done()


def test_a_request_waits_until_its_bytes_fit_and_stat_goes_first() -> None:
    from processors.preprocess_pool import MemoryAdmission

    async def run() -> list[str]:
        budget = MemoryAdmission(100)
        order: list[str] = []
        first = await budget.acquire("routine", 60)
        assert budget.in_use == 60

        async def job(lane: str, size: int) -> int:
            cost = await budget.acquire(lane, size)
            order.append(f"{lane}:{size}")
            return cost

        routine = asyncio.create_task(job("routine", 50))
        urgent = asyncio.create_task(job("urgent", 50))
        stat = asyncio.create_task(job("stat", 50))
        assert not await _started(routine) and not await _started(stat) and budget.waiting == 3
        budget.release(first)  # 100 free: stat (50) and then urgent (50), routine still waits
        assert await _started(stat) and await _started(urgent) and not await _started(routine)
        assert budget.in_use == 100
        budget.release(stat.result())
        assert await _started(routine)
        budget.release(urgent.result())
        budget.release(routine.result())
        assert budget.in_use == 0 and budget.waiting == 0
        return order

    assert asyncio.run(run()) == ["stat:50", "urgent:50", "routine:50"]


def test_a_request_larger_than_the_budget_runs_alone_and_never_deadlocks() -> None:
    from processors.preprocess_pool import MemoryAdmission

    async def run() -> None:
        budget = MemoryAdmission(100)
        small = await budget.acquire("routine", 10)
        huge = asyncio.create_task(budget.acquire("stat", 10_000))
        assert not await _started(huge)
        budget.release(small)
        assert await _started(huge) and huge.result() == 100 and budget.in_use == 100
        # While it runs nothing else fits; after it, everything does.
        other = asyncio.create_task(budget.acquire("stat", 1))
        assert not await _started(other)
        budget.release(huge.result())
        assert await _started(other)
        budget.release(other.result())
        assert budget.in_use == 0

    asyncio.run(run())


def test_the_first_waiter_holds_later_smaller_ones_of_its_lane_and_lower_lanes() -> None:
    """No slipping past: a big stat series waiting for memory is not starved by small routine
    ones that would fit; a cancelled waiter lets the queue move on."""
    from processors.preprocess_pool import MemoryAdmission

    async def run() -> None:
        budget = MemoryAdmission(100)
        running = await budget.acquire("routine", 70)
        big_stat = asyncio.create_task(budget.acquire("stat", 80))
        small_routine = asyncio.create_task(budget.acquire("routine", 10))
        assert not await _started(big_stat) and not await _started(small_routine)
        big_stat.cancel()
        with pytest.raises(asyncio.CancelledError):
            await big_stat
        assert await _started(small_routine) and budget.in_use == 80
        budget.release(small_routine.result())
        budget.release(running)
        assert budget.in_use == 0 and budget.waiting == 0

    asyncio.run(run())


def test_the_working_memory_estimate_and_the_header_fallback(series: list[Path]) -> None:
    from pydicom import dcmread

    from processors.preprocess_pool import (
        MIN_WORKING_BYTES,
        estimated_working_bytes,
        pixel_bytes_from_header,
    )

    ds = dcmread(series[0], stop_before_pixels=True)
    assert pixel_bytes_from_header(series) == len(series) * ds.Rows * ds.Columns * 2
    assert pixel_bytes_from_header([]) == 0
    scanner_head = 240 * 512 * 512 * 2
    factors = {s.name: s.working_bytes_per_pixel_byte or 0.0 for s in registry.specs().values()}
    factor = factors["ich_classifier"]
    assert estimated_working_bytes(scanner_head, "ich_classifier") == int(factor * scanner_head)
    # A 2D image is preprocessed at its full matrix: more per pixel byte than a CT volume.
    detector = 3000 * 2400 * 2
    assert estimated_working_bytes(detector, "cxr_triage") > estimated_working_bytes(
        detector, "ich_classifier"
    )
    # Unknown model: the largest factor; nothing known: the minimum.
    assert estimated_working_bytes(scanner_head, "new_model") == int(max(factors.values()) * scanner_head)
    assert estimated_working_bytes(0) == MIN_WORKING_BYTES


def test_prepare_admits_by_memory_and_the_old_call_still_works(series: list[Path]) -> None:
    """`prepare(lane, model, paths)` as the agent calls it today, and with the series' pixel
    bytes: both return the tensor and hand their bytes back to the budget."""
    pools = LanePools({"stat": 1}, {"stat": 0}, memory_budget_bytes=512 * 1024 * 1024)

    async def run() -> tuple[np.ndarray, np.ndarray]:
        old_call, _ = await pools.prepare("stat", "ich_classifier", series)
        new_call, _ = await pools.prepare("stat", "ich_classifier", series, 1 << 40)  # over budget: alone
        assert pools.memory.in_use == 0
        return old_call, new_call

    try:
        old_call, new_call = asyncio.run(run())
    finally:
        pools.shutdown()
    np.testing.assert_array_equal(old_call, new_call)


def test_the_stream_worker_never_imports_torch_or_monai(series: list[Path]) -> None:
    """The first study's preprocessing once imported processors.model_inputs (torch, MONAI)
    in the worker itself, on its event loop: 4-10 s in which no stage ran, and the first
    study after ready alerted 9x slower than the next (bench/realistic_study.py)."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        from pathlib import Path
        from processors.preprocess_pool import LanePools
        pools = LanePools({"stat": 1}, {"stat": 0})
        async def main():
            await pools.warm("stat")
            tensor, _ = await pools.prepare("stat", "ich_classifier", [Path(p) for p in sys.argv[1:]])
            heavy = ("torch", "monai", "processors.model_inputs")
            print(tensor.shape, sorted(m for m in heavy if m in sys.modules))
        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, series)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shape, imported = done.stdout.strip().split(") ", 1)
    assert shape.startswith("(") and shape.count(",") == 3, done.stdout  # a C x D x H x W input came back
    assert imported == "[]", f"the worker process imported {imported}"
