"""Async Triton client for the triage models: priority, timeout, and clear errors.

Uses tritonclient's gRPC asyncio API so an inference agent never blocks the Faust
event loop. Each call carries the lane's Triton priority level (1 = highest; the
model configs declare 3 levels) and both a server-side queue timeout and a client
deadline, so a stuck server surfaces as an `InferenceError`, not a hung stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, InferInput, InferRequestedOutput, KeepAliveOptions
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

INPUT_NAME = "volume"
OUTPUT_NAME = "probability"


def channel_args() -> list[tuple[str, int | bool]]:
    """tritonclient's own channel defaults, plus a short reconnect backoff.

    gRPC reconnects to a server that went away with exponential backoff up to 120 s and
    fails every call in between at once: after Triton restarts, a stat request would
    wait for the channel's next scheduled try, not for Triton (measured here: 7 s after a
    one-minute outage, and it grows with the outage). Trying every second at most keeps
    recovery at the lanes' own retry pace.
    """
    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


class InferenceError(RuntimeError):
    """Triton could not produce a result (unreachable, timed out, model error)."""


@dataclass(frozen=True)
class Inference:
    probability: float
    model_version: str
    elapsed_ms: float


class TritonModelClient:
    def __init__(self, url: str, timeout_s: float) -> None:
        self._url = url
        self._timeout_s = timeout_s
        self._client = InferenceServerClient(url=url, channel_args=channel_args())

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self, model_name: str) -> bool:
        try:
            return bool(await self._client.is_model_ready(model_name))
        except InferenceServerException:
            return False

    async def infer_probability(
        self, model_name: str, volume: np.ndarray, priority: int, headers: dict[str, str] | None = None
    ) -> Inference:
        """Run one preprocessed volume (C, D, H, W) through a probability model.

        `headers` go out as gRPC metadata: a W3C traceparent there lets a Triton started
        with `--trace-config mode=opentelemetry` put its own per-request spans (queue,
        compute) into the study's trace; its infer response carries no timings itself.
        """
        batch = np.ascontiguousarray(volume[np.newaxis], dtype=np.float32)
        inp = InferInput(INPUT_NAME, list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        started = time.perf_counter()
        try:
            result = await self._client.infer(
                model_name,
                [inp],
                outputs=[InferRequestedOutput(OUTPUT_NAME)],
                priority=priority,
                # Server-side queue timeout in microseconds; the client deadline is the backstop.
                timeout=int(self._timeout_s * 1_000_000),
                client_timeout=self._timeout_s,
                headers=headers,
            )
        except InferenceServerException as exc:
            raise InferenceError(f"Triton {self._url} model {model_name}: {exc.message()}") from exc
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        probs = result.as_numpy(OUTPUT_NAME)
        if probs is None or probs.size != 1:
            raise InferenceError(f"model {model_name} returned no single '{OUTPUT_NAME}' value")
        probability = float(probs.reshape(-1)[0])
        if not 0.0 <= probability <= 1.0 or not np.isfinite(probability):
            raise InferenceError(f"model {model_name} returned probability {probability!r} outside [0, 1]")
        return Inference(
            probability=probability,
            model_version=result.get_response().model_version or "1",
            elapsed_ms=elapsed_ms,
        )
