"""Triton Python-backend model: the TorchScript ICH classifier next to this file.

Input  `volume`      FP32 [batch, 3, 32, 96, 96]  (processors.preprocessing.ICH_INPUT_SHAPE)
Output `probability` FP32 [batch, 1]              (sigmoid already applied)

All requests of a dynamic batch run as one forward pass and the outputs are split
back per request. A request with a wrong shape or non-finite values gets its own
error response instead of failing the batch or the server (Triton already checks the
shape against config.pbtxt; this is the second line if the config is ever relaxed),
and a failed forward pass answers every request of that batch with the error.
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

INPUT_NAME = "volume"
OUTPUT_NAME = "probability"
WEIGHTS_FILE = "model.pt"


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        # The shape the weights were trained on: the "input_shape" parameter written with them
        # by models/train_ich.py, else the configured dims.
        trained = config.get("parameters", {}).get("input_shape", {}).get("string_value", "")
        inputs = {i["name"]: i for i in config["input"]}
        dims = trained.split(",") if trained else inputs[INPUT_NAME]["dims"]
        self.input_dims = tuple(int(d) for d in dims)
        if any(d <= 0 for d in self.input_dims):
            raise pb_utils.TritonModelException(f"ich_classifier: no fixed input shape in config ({dims})")
        self.logger = pb_utils.Logger
        # Few intra-op threads per instance: Triton scales with instances, not threads, and
        # the whole stack (Kafka, Faust workers, this) shares a small CPU.
        threads = int(os.environ.get("RADTRIAGE_TORCH_THREADS", "1"))
        torch.set_num_threads(threads)
        path = Path(args["model_repository"]) / args["model_version"] / WEIGHTS_FILE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.15 marks TorchScript deprecated
            self.model = torch.jit.load(str(path), map_location="cpu").eval()
        # First call pays one-off graph optimisation; pay it here, not on a stat study.
        with torch.no_grad():
            self.model(torch.zeros((1, *self.input_dims)))
        self.logger.log_info(
            f"ich_classifier: loaded {path.name}, input {self.input_dims}, {threads} thread(s)"
        )

    def _check(self, volume: np.ndarray) -> str | None:
        if volume.ndim != len(self.input_dims) + 1 or tuple(volume.shape[1:]) != self.input_dims:
            dims = ", ".join(map(str, self.input_dims))
            return f"input '{INPUT_NAME}' must be [batch, {dims}], got {list(volume.shape)}"
        if volume.shape[0] == 0:
            return f"input '{INPUT_NAME}' has an empty batch"
        if not np.isfinite(volume).all():
            return f"input '{INPUT_NAME}' contains NaN or infinity"
        return None

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        batch: list[np.ndarray] = []
        owners: list[tuple[int, int]] = []  # (request index, rows it contributed)
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
            if tensor is None:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"missing input '{INPUT_NAME}'")
                )
                continue
            volume = tensor.as_numpy()
            problem = self._check(volume)
            if problem is not None:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(problem))
                continue
            batch.append(np.asarray(volume, dtype=np.float32))
            owners.append((i, volume.shape[0]))
        if not batch:
            return responses
        try:
            with torch.no_grad():
                probs = self.model(torch.from_numpy(np.concatenate(batch))).numpy().astype(np.float32)
        except Exception as exc:  # answer the batch with the error rather than take down the stub
            self.logger.log_error(f"ich_classifier: forward pass failed: {exc}")
            for i, _ in owners:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"ich_classifier forward pass failed: {exc}")
                )
            return responses
        start = 0
        for i, rows in owners:
            out = pb_utils.Tensor(OUTPUT_NAME, probs[start : start + rows].reshape(rows, 1))
            responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
            start += rows
        return responses

    def finalize(self) -> None:
        self.model = None
