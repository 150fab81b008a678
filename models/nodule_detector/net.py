"""The reference lung-nodule detector: a small MONAI 3D UNet segmenting nodules on the
fixed 2.5 mm chest grid (processors.preprocessing.NODULE_INPUT_SHAPE).

    encoder/decoder  monai.networks.nets.UNet, channels (16, 32, 64, 128), strides 2, 2, 2,
                     one residual unit per level, batch norm (trained on 48^3 patches,
                     run on the whole 96 x 80 x 128 grid: batch norm's running statistics
                     are the same for both, where instance norm's would not be)
    nodule_map       sigmoid of the logits, times the lung region (input channel 1)
                     dilated by LUNG_MARGIN_VOXELS: nothing outside the lungs and the
                     pleura is a nodule, so the heart, chest wall and spine cannot raise
                     false positives, and a juxta-pleural nodule keeps its lung side
    probability      the map's maximum: P(the study has a nodule) is "some voxel is
                     nodule", so a study is positive at a threshold exactly when
                     processors.nodules.find_nodules finds a nodule at that threshold

Why segmentation and not a study classifier: the map gives where (the centre) and how
big (its summed probability is the volume, processors/nodules.py), and training on
patches centred on nodules, on vessels (the hard negatives) and anywhere in the lung
makes the few hundred phantoms go much further than one label per study. ~0.6 M
parameters, ~2.4 MB of float32 weights.
"""

from __future__ import annotations

import torch
from monai.networks.nets import UNet

from models.network_parts import Served
from processors.preprocessing import NODULE_INPUT_SHAPE

MODEL_CHANNELS: tuple[int, int, int, int] = (16, 32, 64, 128)
LUNG_CHANNEL = 1  # processors/preprocessing/, chest CT step 3
LUNG_MARGIN_VOXELS = 3  # 7.5 mm at 2.5 mm: the pleura and a juxta-pleural nodule's wall side


def build_nodule_net(channels: tuple[int, ...] = MODEL_CHANNELS) -> UNet:
    return UNet(
        spatial_dims=3,
        in_channels=NODULE_INPUT_SHAPE[0],
        out_channels=1,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
        norm="batch",
    )


def lung_gate(volume: torch.Tensor) -> torch.Tensor:
    """(N, C, D, H, W) input → (N, 1, D, H, W) 1 within LUNG_MARGIN_VOXELS of the lung region."""
    k = 2 * LUNG_MARGIN_VOXELS + 1
    region = volume[:, LUNG_CHANNEL : LUNG_CHANNEL + 1]
    return torch.nn.functional.max_pool3d(region, kernel_size=k, stride=1, padding=LUNG_MARGIN_VOXELS)


class NoduleWithSigmoid(Served):
    """What Triton serves: (N, 1) P(nodule in the study) and (N, 1, D, H, W) nodule_map."""

    def forward(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nodule_map = torch.sigmoid(self.net(volume)) * lung_gate(volume)
        probability = torch.amax(nodule_map, dim=(2, 3, 4))
        return probability, nodule_map
