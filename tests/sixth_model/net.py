"""The sixth model's network: tiny, untrained, and fixed, so its answer is known. It calls
a study positive by how much of the grid is contrast-bright, and puts the finding on the
side (the grid's x half; +x is the patient's left) that holds more of it."""

from __future__ import annotations

import torch
from torch import nn


class PeNet(nn.Module):
    def forward(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bright = volume.mean(dim=(1, 2, 3, 4))
        half = volume.shape[-1] // 2
        right = volume[..., :half].mean(dim=(1, 2, 3, 4))
        left = volume[..., half:].mean(dim=(1, 2, 3, 4))
        probability = torch.clamp(bright * 8.0, 0.0, 1.0)
        side_left = torch.sigmoid((left - right) * 50.0)
        return probability[:, None], side_left[:, None]


def torchscript() -> torch.jit.ScriptModule:
    """The network as Triton's Python backend loads it (models/serving.py exports the same way)."""
    return torch.jit.script(PeNet().eval())
