"""The reference chest X-ray triage network: a scaled-down MONAI DenseNet, one logit out.

    features   `monai.networks.nets.DenseNet(...).features` — DenseNet121's structure (7x7
               stride-2 stem, max pool, four dense blocks with transitions) with 16 initial
               features, growth rate 8, bottleneck 2 and blocks of (3, 6, 6, 4) layers
               instead of 64 / 32 / 4 / (6, 12, 24, 16): (N, 73, 8, 8) for a 256 x 256 image
    air map    1x1 conv -> (N, 1, 8, 8) logits, supervised in training by the phantoms'
               pneumothorax masks
    head       [global mean and max of the features, max of the air map] -> 1 logit

The DenseNet's own classifier (global average pooling + linear) did not learn the task in
the CPU budget (validation AUC ~0.5 after 4 epochs): a pneumothorax rim is a thin band
along one chest wall, averaged away over the whole image, and one label per image is a
weak signal. The max pooling and the dense map supervision are the same remedy as the
ICH model's (models/ich_classifier/net.py).

Why not DenseNet121 itself: its 7.0 M parameters are ~28 MB of fp32 weights (over the
few-MB budget for committed weights), and one training step (batch 16, 256 x 256) takes
seconds on these 2 cores against a fraction of a second for this net — the few hundred
steps a few minutes allow would not train it (measured figures in
models/cxr_triage/CARD.md). A production model swaps in DenseNet121 at the same input
and output contract.
"""

from __future__ import annotations

import torch

from models.network_parts import Served, dense_features, pooled_with_map
from processors.preprocessing import CXR_INPUT_SHAPE

INIT_FEATURES = 16
GROWTH_RATE = 8
BN_SIZE = 2
BLOCK_CONFIG: tuple[int, int, int, int] = (3, 6, 6, 4)
MAP_STRIDE = 32  # input pixels per air-map cell


class CxrNet(torch.nn.Module):
    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.features, channels = dense_features(
            CXR_INPUT_SHAPE[0],
            1,
            init_features=INIT_FEATURES,
            growth_rate=GROWTH_RATE,
            bn_size=BN_SIZE,
            block_config=BLOCK_CONFIG,
        )
        self.air_map = torch.nn.Conv2d(channels, 1, kernel_size=1)
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(2 * channels + 1, 1)

    def forward_with_map(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.features(image))
        air = self.air_map(f)
        return self.head(pooled_with_map(f, air, self.dropout)), air

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_with_map(image)[0]


def build_cxr_net() -> CxrNet:
    return CxrNet()


class CxrWithSigmoid(Served):
    """What Triton serves: (N, 1) P(critical finding: pneumothorax)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(image))
