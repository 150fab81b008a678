"""Async Triton client for the triage models: priority, timeout, and clear errors.

Uses tritonclient's gRPC asyncio API so an inference agent never blocks the Faust
event loop. Each call carries the lane's Triton priority level (1 = highest; the
model configs declare 3 levels) and both a server-side queue timeout and a client
deadline, so a stuck server surfaces as an `InferenceError`, not a hung stream.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, InferInput, KeepAliveOptions
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
    # Every other single-value output the model declared, by its Triton name (the LVO
    # detector's "side_left_probability"): a model gains outputs without a client change.
    outputs: Mapping[str, float] = field(default_factory=dict)
    # Multi-value outputs (the ICH classifier's "localisation_map"), batch axis removed:
    # what processors/localisation.py turns into a slice range.
    maps: Mapping[str, np.ndarray] = field(default_factory=dict)


def read_outputs(model_name: str, arrays: Mapping[str, np.ndarray | None]) -> tuple[float, dict[str, float]]:
    """The main `probability` and the other single-value numeric outputs of one response.

    Pure (unit-tested on plain arrays). `probability`, and any output whose name says it is
    a probability, must be one finite value in [0, 1]: a model returning anything else is
    broken, and its result must not become a finding. Outputs of more than one value (a
    segmentation map, say) or of non-numeric type are not findings' material and are left
    out rather than failing the study.
    """
    probs = arrays.get(OUTPUT_NAME)
    if probs is None or probs.size != 1:
        raise InferenceError(f"model {model_name} returned no single '{OUTPUT_NAME}' value")
    extras: dict[str, float] = {}
    for name, values in arrays.items():
        if name == OUTPUT_NAME or values is None or values.size != 1:
            continue
        if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
            continue
        extras[name] = _checked(model_name, name, float(values.reshape(-1)[0]))
    return _checked(model_name, OUTPUT_NAME, float(probs.reshape(-1)[0])), extras


def read_maps(arrays: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray]:
    """The multi-value numeric outputs of one single-study response (maps, profiles), as
    float32 with the batch axis of 1 removed. Pure. A map with a NaN or infinity is left
    out: localisation is a by-product, and a broken map must cost the finding its range,
    not the study its probability."""
    maps: dict[str, np.ndarray] = {}
    for name, values in arrays.items():
        if name == OUTPUT_NAME or values is None or values.size <= 1:
            continue
        if not np.issubdtype(values.dtype, np.number):
            continue
        m = np.asarray(values, dtype=np.float32)
        if m.ndim > 1 and m.shape[0] == 1:
            m = m[0]
        if np.isfinite(m).all():
            maps[name] = m
    return maps


def _checked(model_name: str, name: str, value: float) -> float:
    if not np.isfinite(value):
        raise InferenceError(f"model {model_name} returned {name} {value!r}, not a finite number")
    if name.endswith("probability") and not 0.0 <= value <= 1.0:
        raise InferenceError(f"model {model_name} returned {name} {value!r} outside [0, 1]")
    return value


class TritonModelClient:
    def __init__(self, url: str, timeout_s: float, auth_headers: dict[str, str] | None = None) -> None:
        """`auth_headers`: the key a restricted Triton wants (TritonSettings.grpc_auth_headers)."""
        self._url = url
        self._timeout_s = timeout_s
        self._auth = dict(auth_headers or {})
        self._client = InferenceServerClient(url=url, channel_args=channel_args())

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self, model_name: str, model_version: str = "") -> bool:
        try:
            return bool(await self._client.is_model_ready(model_name, model_version, headers=self._auth))
        except InferenceServerException:
            return False

    async def warm(self, model_name: str, model_version: str = "", priority: int = 0) -> float:
        """One inference on zeros of the model's declared input shape, so the first study
        does not pay for the model's first run (lazy allocation, backend start-up). Returns
        the call's milliseconds; raises InferenceError when Triton cannot serve the model."""
        try:
            meta = await self._client.get_model_metadata(
                model_name, model_version, headers=self._auth, client_timeout=self._timeout_s
            )
        except InferenceServerException as exc:
            raise InferenceError(f"Triton {self._url} model {model_name}: {exc.message()}") from exc
        (tensor,) = [t for t in meta.inputs if t.name == INPUT_NAME] or [meta.inputs[0]]
        # The served models batch (max_batch_size > 0): the first axis is the batch, which
        # infer_probability adds itself.
        shape = [int(d) for d in tensor.shape][1:]
        if any(d < 1 for d in shape):
            raise InferenceError(f"model {model_name}: input shape {list(tensor.shape)} has a free axis")
        started = time.perf_counter()
        # Noise in [0, 1), not zeros: an all-zero input is not an image to every model (the
        # mammography model reads all-zero views as absent and has nothing to answer).
        noise = np.random.default_rng(0).random(shape, dtype=np.float32)
        await self.infer_probability(model_name, noise, priority, None, model_version)
        return (time.perf_counter() - started) * 1000.0

    async def infer_probability(
        self,
        model_name: str,
        volume: np.ndarray,
        priority: int,
        headers: dict[str, str] | None = None,
        model_version: str = "",
    ) -> Inference:
        """Run one preprocessed volume (C, D, H, W) through a probability model.

        No outputs are named in the request, so Triton returns every output the model
        declares; `read_outputs` keeps `probability` and the model's other scalar outputs,
        `read_maps` its multi-value ones (a localisation map).

        `model_version` "" lets Triton's version policy choose (the latest version).

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
                model_version=model_version,
                priority=priority,
                # Server-side queue timeout in microseconds; the client deadline is the backstop.
                timeout=int(self._timeout_s * 1_000_000),
                client_timeout=self._timeout_s,
                headers={**(headers or {}), **self._auth},
            )
        except InferenceServerException as exc:
            which = f"{model_name} version {model_version}" if model_version else model_name
            raise InferenceError(f"Triton {self._url} model {which}: {exc.message()}") from exc
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        response = result.get_response()
        try:
            arrays = {o.name: result.as_numpy(o.name) for o in response.outputs}
        except ValueError as exc:  # a response whose data does not fill its declared shape
            raise InferenceError(f"model {model_name} returned a malformed output: {exc}") from exc
        probability, extras = read_outputs(model_name, arrays)
        return Inference(
            probability=probability,
            model_version=response.model_version or "1",
            elapsed_ms=elapsed_ms,
            outputs=extras,
            maps=read_maps(arrays),
        )
