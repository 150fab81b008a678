"""The reference ICH classifier: a small 3D CNN of MONAI blocks, one logit out.

Three MONAI `Convolution` blocks (conv + PReLU; the first at full resolution so a
2-voxel bleed survives it) then global max- and average-pooling. Max pooling is the
inductive bias the task wants — "is there a hyperdense blob anywhere" — and keeps a
small bleed's signal from being averaged away.

Why this small: on 2 CPU cores a larger 4-stage network (and a MONAI `Classifier`)
memorised the training phantoms (train loss 0.09) while staying at chance on held-out
ones; this one has too few parameters to memorise and must learn the blob detector.
No normalisation layer: absolute intensity after the blood window is the signal, and
batch norm with 16-volume batches collapsed in eval mode. A production model would
swap in a DenseNet121 or ResNet at the same input and output contract.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers import Act

from processors.preprocessing import ICH_INPUT_SHAPE

MODEL_CHANNELS = (8, 16, 16)


class IchNet(torch.nn.Module):
    def __init__(
        self, in_channels: int = ICH_INPUT_SHAPE[0], channels: tuple[int, int, int] = MODEL_CHANNELS
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.features = torch.nn.Sequential(
            Convolution(3, in_channels, c1, strides=1, kernel_size=3, act=Act.PRELU, norm=None),
            Convolution(3, c1, c2, strides=2, kernel_size=3, act=Act.PRELU, norm=None),
            Convolution(3, c2, c3, strides=1, kernel_size=3, act=Act.PRELU, norm=None),
        )
        self.head = torch.nn.Linear(2 * c3, 1)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        f = self.features(volume)
        pooled = torch.cat([torch.amax(f, dim=(2, 3, 4)), torch.mean(f, dim=(2, 3, 4))], dim=1)
        return self.head(pooled)


def build_ich_net() -> torch.nn.Module:
    return IchNet()


class IchWithSigmoid(torch.nn.Module):
    """What Triton serves: probability, not logit, so every client reads the same scale."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(volume))
