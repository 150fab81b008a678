"""Studies sent to a real Triton the way the lanes send them (processors.triton_client), for
the integration tests of the served models."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from processors.triton_client import Inference, TritonModelClient


async def lane_results(
    url: str,
    model: str,
    tensors: Sequence[np.ndarray],
    priorities: Sequence[int] | None = None,
    timeout_s: float = 60,
) -> list[Inference]:
    """One concurrent request a tensor through one client, each at its priority (by default
    the lanes' 1, 2, 3 in turn, so every priority level is exercised)."""
    levels = priorities if priorities is not None else [1 + i % 3 for i in range(len(tensors))]
    client = TritonModelClient(url, timeout_s=timeout_s)
    try:
        return list(
            await asyncio.gather(
                *(
                    client.infer_probability(model, t, priority=p)
                    for t, p in zip(tensors, levels, strict=True)
                )
            )
        )
    finally:
        await client.close()
