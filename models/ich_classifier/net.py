"""The reference ICH classifier: a small 3D CNN of MONAI blocks, one logit out.

    stem      MONAI Convolution, stride (1, 2, 2)       3 -> c0  32 x 48 x 48
    stage 1   MONAI ResidualUnit (2 subunits), stride 2 c0 -> c1 16 x 24 x 24
    stage 2   MONAI ResidualUnit (2 subunits), stride 2 c1 -> c2  8 x 12 x 12
    blood map 1x1x1 conv on stage 1 -> (N, 1, 16, 24, 24) logits, supervised in training by
              the phantoms' blood masks; served (sigmoid) as the localisation map
    head      dropout(global max and mean of stage 2) + max of the blood map -> linear -> 1 logit

Why this shape: "is there hyperdense blood anywhere" is a detection question, so the
features are pooled globally — max pooling keeps a small bleed's response from being
averaged away, the mean adds context for large, faint ones — instead of the flattened
position-specific dense layer of `monai.networks.nets.Classifier`, which memorises
where blood was in the training phantoms. The stem halves the in-plane size at once
(its 3 x 3 x 3 kernel still sees every input voxel) because full-resolution stages are
what makes a 3D CNN slow on two CPU cores. Instance norm, not batch norm: training uses
small batches (many optimiser steps per CPU-minute), where batch statistics are noise,
and per-study normalisation also evens out the studies' different noise levels.
~0.28 M parameters (1.2 MB). A production model would swap in a DenseNet121 or ResNet
at the same input and output contract.
"""

from __future__ import annotations

import torch

from models.network_parts import ResidualBackboneNet, Served
from processors.preprocessing import ICH_INPUT_SHAPE

MODEL_CHANNELS: tuple[int, int, int] = (16, 32, 64)


class IchNet(ResidualBackboneNet):
    def __init__(
        self,
        in_channels: int = ICH_INPUT_SHAPE[0],
        channels: tuple[int, int, int] = MODEL_CHANNELS,
        dropout: float = 0.2,
    ) -> None:
        super().__init__(in_channels, channels)
        _, c1, c2 = channels
        # Blood map at stage-1 resolution (1/2, 1/4, 1/4), supervised in training by the
        # phantoms' ground truth: dense supervision teaches the early features to be blood
        # detectors from far fewer studies than the single study-level label would.
        self.blood_map = torch.nn.Conv3d(c1, 1, kernel_size=1)
        self.dropout = torch.nn.Dropout(dropout)
        # Study logit from the pooled deep features plus the blood map's strongest cell: a small
        # bleed that stage 2 dilutes still lights up one cell of the finer map.
        self.head = torch.nn.Linear(2 * c2 + 1, 1)

    def forward_with_map(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, D, H, W) → ((N, 1) study logits, (N, 1, D/2, H/4, W/4) blood-map logits)."""
        f1, f2 = self.backbone(volume)
        blood_map = self.blood_map(f1)
        pooled = torch.cat(
            [
                self.dropout(torch.amax(f2, dim=(2, 3, 4))),
                self.dropout(torch.mean(f2, dim=(2, 3, 4))),
                torch.amax(blood_map, dim=(2, 3, 4)),
            ],
            dim=1,
        )
        return self.head(pooled), blood_map

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """(N, C, D, H, W) preprocessed volumes → (N, 1) logits (what is served)."""
        return self.forward_with_map(volume)[0]


def build_ich_net() -> IchNet:
    return IchNet()


class IchWithSigmoid(Served):
    """What Triton serves, in its config's output order: probabilities, not logits, so every
    client reads the same scale.

    * `probability`      (N, 1): P(ICH) for the study;
    * `localisation_map` (N, D/2, H/4, W/4) = (N, 16, 24, 24): the blood map, P(blood in
      this cell), what processors/localisation.py turns into the finding's slice range.
    """

    net: IchNet

    def __init__(self, net: IchNet) -> None:
        super().__init__(net)

    def forward(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, blood_map = self.net.forward_with_map(volume)
        return torch.sigmoid(logits), torch.sigmoid(blood_map[:, 0])
