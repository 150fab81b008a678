"""The pieces the reference networks share, as functions so that each network keeps its
own attribute names (the committed TorchScript weights' parameter names stay valid):

* `residual_backbone`, `ResidualBackboneNet`: the CT models' 3D stem and two residual
  stages (ICH, LVO), as modules and as the base class that holds and runs them;
* `dense_features`: the 2D models' scaled-down DenseNet121 feature extractor (chest X-ray,
  mammography);
* `pooled_with_map`: the 2D models' head input, the global mean and max of the features
  (dropped out) and the strongest cell of the auxiliary map (chest X-ray, mammography);
* `Served`: the base of every model's served wrapper (network + sigmoids), which holds the
  trained network as `net` (the prefix of the TorchScript file's parameter names).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.layers import Act, Norm
from monai.networks.nets import DenseNet


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


class ResidualBackboneNet(torch.nn.Module):
    """A CT model's network up to its heads: `residual_backbone` as `stem`, `stage1` and
    `stage2`, registered first (the subclass adds its map and heads after them)."""

    def __init__(self, in_channels: int, channels: tuple[int, int, int]) -> None:
        super().__init__()
        self.stem, self.stage1, self.stage2 = residual_backbone(in_channels, channels)

    def backbone(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, D, H, W) -> (stage-1 features, where the map goes; stage-2 features)."""
        f1 = self.stage1(self.stem(volume))
        return f1, self.stage2(f1)


def dense_features(
    in_channels: int,
    out_channels: int,
    *,
    init_features: int,
    growth_rate: int,
    bn_size: int,
    block_config: tuple[int, int, int, int],
) -> tuple[torch.nn.Module, int]:
    """The `features` of a 2D `monai.networks.nets.DenseNet` and how many channels they end
    with. The DenseNet's own classifier is built and dropped: building it (for
    `out_channels`) keeps a seeded run's initial weights what they were when each network
    built its DenseNet itself."""
    dense = DenseNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        init_features=init_features,
        growth_rate=growth_rate,
        block_config=block_config,
        bn_size=bn_size,
    )
    classifier = dense.class_layers.out
    assert isinstance(classifier, torch.nn.Linear)
    return dense.features, classifier.in_features


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


class Served(torch.nn.Module):
    """What Triton serves of a model: its trained network as `net` (so the traced file's
    parameters are `net.*`, what models/ich_classifier/train.py reloads), and in the
    subclass's `forward` the probabilities, not logits, so every client reads one scale."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
