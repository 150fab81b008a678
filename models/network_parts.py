"""The pieces the reference networks share, as functions so that each network keeps its
own attribute names (the committed TorchScript weights' parameter names stay valid):

* `residual_backbone`: the CT models' 3D stem and two residual stages (ICH, LVO);
* `pooled_with_map`: the 2D models' head input, the global mean and max of the features
  (dropped out) and the strongest cell of the auxiliary map (chest X-ray, mammography).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.layers import Act, Norm


def residual_backbone(
    in_channels: int, channels: tuple[int, int, int]
) -> tuple[Convolution, ResidualUnit, ResidualUnit]:
    """Stem (stride 1, 2, 2), stage 1 and stage 2 (stride 2 each, two subunits): 3D
    convolutions of kernel 3 with instance norm and ReLU; stage 1 is at 1/2, 1/4, 1/4 of the
    input, where the CT models put their auxiliary map."""
    c0, c1, c2 = channels
    common = {"spatial_dims": 3, "kernel_size": 3, "act": Act.RELU, "norm": Norm.INSTANCE}
    stem = Convolution(in_channels=in_channels, out_channels=c0, strides=(1, 2, 2), **common)
    stage1 = ResidualUnit(in_channels=c0, out_channels=c1, strides=2, subunits=2, **common)
    stage2 = ResidualUnit(in_channels=c1, out_channels=c2, strides=2, subunits=2, **common)
    return stem, stage1, stage2


def pooled_with_map(
    features: torch.Tensor, map_logits: torch.Tensor, dropout: torch.nn.Module
) -> torch.Tensor:
    """(N, 2 C + 1): [mean of the features, max of the features, max of the map] over every
    spatial dimension. The max keeps a finding that fills a few cells from being averaged
    away; the map's max is a small finding's strongest evidence."""
    spatial = tuple(range(2, features.ndim))
    return torch.cat(
        [
            dropout(torch.mean(features, dim=spatial)),
            dropout(torch.amax(features, dim=spatial)),
            torch.amax(map_logits, dim=spatial),
        ],
        dim=1,
    )
