"""Triton Python-backend model: the TorchScript network next to this file, any number of outputs.

The same file serves every radtriage reference model (ich_classifier, lvo_detector,
cxr_triage, mammo_birads, nodule_detector): this is deploy/triton/python_backend/model.py,
the one committed copy; models/backend.py writes a generated copy into each version
directory (a stock tritonserver needs it there) when the weights are exported and before
a repository is served. It reads the input name and shape and the output names from the
model's config; the TorchScript module returns one (N, ...) tensor per configured output,
in the configured order, and each request gets its rows with the shape the module gave them.

    ich_classifier volume FP32 [batch, 3, 32, 96, 96] -> probability [batch, 1],
                                                         localisation_map [batch, 16, 24, 24]
    lvo_detector   volume FP32 [batch, 3, 32, 96, 96] -> probability [batch, 1],
                                                         side_left_probability [batch, 1]
    cxr_triage     volume FP32 [batch, 1, 256, 256]   -> probability [batch, 1]
    mammo_birads   volume FP32 [batch, 4, 256, 192]   -> probability [batch, 1],
                                                         birads_probabilities [batch, 4, 6]
    nodule_detector volume FP32 [batch, 2, 96, 80, 128] -> probability [batch, 1],
                                                         nodule_map [batch, 1, 96, 80, 128]

All requests of a dynamic batch run as one forward pass and the outputs are split back
per request. A request with a wrong shape or non-finite values gets its own error
response instead of failing the batch; a failed forward pass answers every request of
that batch with the error. On a KIND_GPU instance (configs/gpu.pbtxt) the weights and
the batch go to that instance's GPU.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # provided by the Python backend at run time

WEIGHTS_FILE = "model.pt"


def _rows(out: np.ndarray, start: int, rows: int) -> np.ndarray:
    """One request's rows of a batch output: (rows, k) for a per-study vector or scalar
    (a (N,) output becomes (rows, 1)), (rows, ...) as the module shaped it otherwise."""
    part = out[start : start + rows]
    return np.ascontiguousarray(part.reshape(rows, 1) if part.ndim == 1 else part)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        (inp,) = config["input"]
        self.input_name = inp["name"]
        self.output_names = [o["name"] for o in config["output"]]
        trained = config.get("parameters", {}).get("input_shape", {}).get("string_value", "")
        dims = trained.split(",") if trained else inp["dims"]
        self.input_dims = tuple(int(d) for d in dims)
        if any(d <= 0 for d in self.input_dims):
            raise pb_utils.TritonModelException(f"{self.name}: no fixed input shape in config ({dims})")
        self.logger = pb_utils.Logger
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{args.get('model_instance_device_id', '0')}")
        else:
            self.device = torch.device("cpu")
            # Few intra-op threads per instance: Triton scales with instances, and the whole
            # local stack (Kafka, Faust workers, this) shares a small CPU.
            torch.set_num_threads(int(os.environ.get("RADTRIAGE_TORCH_THREADS", "1")))
        path = Path(args["model_repository"]) / args["model_version"] / WEIGHTS_FILE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.15 marks TorchScript deprecated
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        # First call pays one-off graph optimisation; pay it here, not on a stat study.
        with torch.no_grad():
            outs = self._forward(torch.zeros((1, *self.input_dims), device=self.device))
        if len(outs) != len(self.output_names):
            raise pb_utils.TritonModelException(
                f"{self.name}: weights return {len(outs)} output(s), config names {self.output_names}"
            )
        self.logger.log_info(f"{self.name}: loaded {path.name} on {self.device}, input {self.input_dims}")

    def _forward(self, batch: torch.Tensor) -> list[np.ndarray]:
        out = self.model(batch)
        outs = out if isinstance(out, tuple | list) else (out,)
        return [o.detach().to("cpu").numpy().astype(np.float32) for o in outs]

    def _check(self, x: np.ndarray) -> str | None:
        if x.ndim != len(self.input_dims) + 1 or tuple(x.shape[1:]) != self.input_dims:
            dims = ", ".join(map(str, self.input_dims))
            return f"input '{self.input_name}' must be [batch, {dims}], got {list(x.shape)}"
        if x.shape[0] == 0:
            return f"input '{self.input_name}' has an empty batch"
        if not np.isfinite(x).all():
            return f"input '{self.input_name}' contains NaN or infinity"
        return None

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        batch: list[np.ndarray] = []
        owners: list[tuple[int, int]] = []  # (request index, rows it contributed)
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            if tensor is None:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"missing input '{self.input_name}'")
                )
                continue
            x = tensor.as_numpy()
            problem = self._check(x)
            if problem is not None:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(problem))
                continue
            batch.append(np.asarray(x, dtype=np.float32))
            owners.append((i, x.shape[0]))
        if not batch:
            return responses
        try:
            with torch.no_grad():
                outs = self._forward(torch.from_numpy(np.concatenate(batch)).to(self.device))
        except Exception as exc:  # answer the batch with the error rather than take down the stub
            self.logger.log_error(f"{self.name}: forward pass failed: {exc}")
            for i, _ in owners:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.name} forward pass failed: {exc}")
                )
            return responses
        start = 0
        for i, rows in owners:
            tensors = [
                pb_utils.Tensor(name, _rows(out, start, rows))
                for name, out in zip(self.output_names, outs, strict=True)
            ]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += rows
        return responses

    def finalize(self) -> None:
        self.model = None
