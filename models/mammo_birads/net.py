"""The reference mammography BI-RADS network: a scaled-down MONAI DenseNet per view, 6 logits out.

    features    `monai.networks.nets.DenseNet(...).features` (2D, the chest X-ray model's
                scaled-down DenseNet121 structure): (N, C, 8, 6) for a 256 x 192 view
    lesion map  1x1 conv -> (N, 1, 8, 6) logits, supervised in training by the phantoms'
                lesion masks (a 6 mm mass is a few per cent of one cell: one label per
                image alone is a weak signal, as for the pneumothorax rim)
    head        [global mean and max of the features, max of the lesion map] -> 6 logits,
                P(BI-RADS 0..5) for the view

One network reads every view (chest wall at column 0 whatever the breast:
processors/preprocessing/), so a study's four views are four rows of one batch.
`MammoServed` is what Triton runs: (N, 4, 256, 192) in, per study

    probability           (N, 1)     max over present views of P(4) + P(5)
    birads_probabilities  (N, 4, 6)  per view P(0..5); zeros for a view the series lacks

A view is absent when its channel is all zeros (the preprocessing's marker; a present
view is normalised to reach 1). processors/birads.py turns the rows into categories.
Category 6 (known biopsy-proven cancer) is clinical and has no output.
"""

from __future__ import annotations

import torch

from models.network_parts import Served, dense_features, pooled_with_map

CATEGORIES = 6  # BI-RADS 0..5
INIT_FEATURES = 16
GROWTH_RATE = 12
BN_SIZE = 2
BLOCK_CONFIG: tuple[int, int, int, int] = (3, 6, 6, 4)
MAP_STRIDE = 32  # input pixels per lesion-map cell
HIGH_PASS_SIGMA = 3.0  # input pixels (mm): removes the breast's slow density, keeps margins
HIGH_PASS_GAIN = 4.0


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = int(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


class MammoViewNet(torch.nn.Module):
    """Two channels into the DenseNet: the view, and its high-pass (view minus a Gaussian
    blur of it). Masses, margins, spicules and calcifications are local contrast on top of
    a fibroglandular background that varies more than they do; the fixed filter hands the
    network that contrast instead of making it learn it from few examples (the same idea
    as the ICH model's blood window). Computed inside the network, so the served input is
    the plain view."""

    blur: torch.Tensor

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("blur", _gaussian_kernel(HIGH_PASS_SIGMA))
        self.features, channels = dense_features(
            2,
            CATEGORIES,
            init_features=INIT_FEATURES,
            growth_rate=GROWTH_RATE,
            bn_size=BN_SIZE,
            block_config=BLOCK_CONFIG,
        )
        self.lesion_map = torch.nn.Conv2d(channels, 1, kernel_size=1)
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(2 * channels + 1, CATEGORIES)

    def high_pass(self, view: torch.Tensor) -> torch.Tensor:
        k = self.blur
        pad = k.numel() // 2
        smooth = torch.nn.functional.conv2d(
            torch.nn.functional.pad(view, (pad, pad, 0, 0), mode="replicate"), k.reshape(1, 1, 1, -1)
        )
        smooth = torch.nn.functional.conv2d(
            torch.nn.functional.pad(smooth, (0, 0, pad, pad), mode="replicate"), k.reshape(1, 1, -1, 1)
        )
        return HIGH_PASS_GAIN * (view - smooth)

    def forward_with_map(self, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, H, W) views -> (N, 6) logits and (N, 1, H/32, W/32) lesion-map logits."""
        f = torch.relu(self.features(torch.cat([view, self.high_pass(view)], dim=1)))
        lesion = self.lesion_map(f)
        return self.head(pooled_with_map(f, lesion, self.dropout)), lesion

    def forward(self, view: torch.Tensor) -> torch.Tensor:
        return self.forward_with_map(view)[0]


def build_mammo_net() -> MammoViewNet:
    return MammoViewNet()


class MammoServed(Served):
    """What Triton serves: a study's views in, (probability, birads_probabilities) out."""

    def forward(self, study: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, v, h, w = study.shape
        probs = torch.softmax(self.net(study.reshape(n * v, 1, h, w)), dim=1).reshape(n, v, CATEGORIES)
        present = (torch.amax(study.reshape(n, v, h * w), dim=2) > 0).to(probs.dtype)
        probs = probs * present.unsqueeze(2)
        suspicious = probs[:, :, 4] + probs[:, :, 5]
        return torch.amax(suspicious, dim=1, keepdim=True).clamp(0.0, 1.0), probs
