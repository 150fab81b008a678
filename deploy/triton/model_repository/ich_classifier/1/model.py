"""Triton Python-backend model: the TorchScript ICH classifier next to this file.

All requests of a dynamic batch run as one forward pass; a request with the wrong
shape gets its own error response instead of failing the batch or the server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # provided by the Python backend


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.input_dims = tuple(config["input"][0]["dims"])
        # One intra-op thread per instance: Triton scales with instances, not threads,
        # and several models share the CPU.
        torch.set_num_threads(int(os.environ.get("RADTRIAGE_TORCH_THREADS", "1")))
        path = Path(args["model_repository"]) / args["model_version"] / "model.pt"
        self.model = torch.jit.load(str(path), map_location="cpu").eval()

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        batch: list[np.ndarray] = []
        owners: list[tuple[int, int]] = []  # (request index, rows in batch)
        for i, request in enumerate(requests):
            volume = pb_utils.get_input_tensor_by_name(request, "volume").as_numpy()
            if volume.ndim != len(self.input_dims) + 1 or tuple(volume.shape[1:]) != self.input_dims:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(
                        f"input 'volume' must be [batch, {', '.join(map(str, self.input_dims))}], "
                        f"got {list(volume.shape)}"
                    )
                )
                continue
            if not np.isfinite(volume).all():
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("input 'volume' contains NaN or infinity")
                )
                continue
            batch.append(volume.astype(np.float32, copy=False))
            owners.append((i, volume.shape[0]))
        if batch:
            with torch.no_grad():
                probs = self.model(torch.from_numpy(np.concatenate(batch))).numpy().astype(np.float32)
            start = 0
            for i, rows in owners:
                out = pb_utils.Tensor("probability", probs[start : start + rows].reshape(rows, 1))
                responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
                start += rows
        return responses

    def finalize(self) -> None:
        self.model = None
