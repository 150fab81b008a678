"""The reference chest X-ray triage network: a scaled-down MONAI DenseNet, one logit out.

`monai.networks.nets.DenseNet` — the DenseNet121 architecture family the issue names —
with DenseNet121's structure (7x7 stride-2 stem, max pool, four dense blocks with
transitions, global average pooling, linear classifier) but 16 initial features, growth
rate 8, bottleneck 2 and blocks of (3, 6, 6, 4) layers instead of 64 / 32 / 4 /
(6, 12, 24, 16): ~46 k parameters instead of 7.0 M.

Why not DenseNet121 itself: its 7.0 M parameters are ~28 MB of fp32 weights (over the
few-MB budget for committed weights), and one training step (batch 16, 256 x 256) takes
several seconds on these 2 cores against ~0.4 s for this net — the ~500 steps a few
minutes allow would not train it (measured figures in models/cards/cxr_triage.md). A
production model swaps in DenseNet121 at the same input and output contract.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet

from processors.preprocessing import CXR_INPUT_SHAPE

INIT_FEATURES = 16
GROWTH_RATE = 8
BN_SIZE = 2
BLOCK_CONFIG: tuple[int, int, int, int] = (3, 6, 6, 4)


def build_cxr_net(dropout: float = 0.1) -> torch.nn.Module:
    return DenseNet(
        spatial_dims=2,
        in_channels=CXR_INPUT_SHAPE[0],
        out_channels=1,
        init_features=INIT_FEATURES,
        growth_rate=GROWTH_RATE,
        block_config=BLOCK_CONFIG,
        bn_size=BN_SIZE,
        dropout_prob=dropout,
    )


class CxrWithSigmoid(torch.nn.Module):
    """What Triton serves: (N, 1) P(critical finding: pneumothorax)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(image))
