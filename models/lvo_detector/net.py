"""The reference LVO detector: a small 3D CNN of MONAI blocks, two logits out (LVO, side).

    stem       MONAI Convolution, stride (1, 2, 2)       2 -> c0  32 x 48 x 48
    stage 1    MONAI ResidualUnit (2 subunits), stride 2 c0 -> c1 16 x 24 x 24
    stage 2    MONAI ResidualUnit (2 subunits), stride 2 c1 -> c2  8 x 12 x 12
    clot map   1x1x1 conv on stage 1 -> (N, 1, 16, 24, 24) logits, supervised in training
               by the phantoms' clot masks ("the contrast column stops here")
    LVO head   [both halves' pooled stage 2, |left - right|, max of the clot map] -> 1 logit
    side head  [left - right of pooled stage 2 and of the clot map's log-sum-exp] -> 1 logit,
               no bias: P(left) from evidence on the left against evidence on the right

The halves are the last axis split at its middle (the patient's right | left, see
processors/preprocessing/): the preprocessing crops and pads the head symmetrically
enough that the midline falls near the middle, and the network only compares the two.
An occlusion is an absence — a tube that stops, a territory that fills less — so the
explicit left-right difference is what lets a network this small see it from a few
hundred studies; the max pooling of the clot map keeps a short gap from being averaged
away. Without a bias the side logit is 0 (P = 0.5) for a perfectly symmetric input,
which is what "no side" should look like. ~0.28 M parameters.
"""

from __future__ import annotations

import torch

from models.network_parts import ResidualBackboneNet, Served
from processors.preprocessing import LVO_INPUT_SHAPE

MODEL_CHANNELS: tuple[int, int, int] = (16, 32, 64)


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, D, H, W) → (right half, left half) along W (columns run to the patient's left)."""
    w = t.shape[-1] // 2
    return t[..., :w], t[..., w:]


class LvoNet(ResidualBackboneNet):
    def __init__(
        self,
        in_channels: int = LVO_INPUT_SHAPE[0],
        channels: tuple[int, int, int] = MODEL_CHANNELS,
        dropout: float = 0.2,
    ) -> None:
        super().__init__(in_channels, channels)
        _, c1, c2 = channels
        self.clot_map = torch.nn.Conv3d(c1, 1, kernel_size=1)
        self.dropout = torch.nn.Dropout(dropout)
        self.lvo_head = torch.nn.Linear(2 * 2 * c2 + 1, 1)
        self.side_head = torch.nn.Linear(2 * c2 + 1, 1, bias=False)

    def forward_with_map(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C, D, H, W) → ((N, 1) LVO logits, (N, 1) left-vs-right logits, clot-map logits)."""
        f1, f2 = self.backbone(volume)
        clot = self.clot_map(f1)
        right, left = _halves(f2)

        def pooled(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.amax(t, dim=(2, 3, 4)), torch.mean(t, dim=(2, 3, 4))], dim=1)

        p_right, p_left = pooled(right), pooled(left)
        c_right, c_left = (torch.logsumexp(h.flatten(1), dim=1, keepdim=True) for h in _halves(clot))
        lvo_in = torch.cat(
            [
                self.dropout(p_left + p_right),
                self.dropout(torch.abs(p_left - p_right)),
                torch.amax(clot, dim=(2, 3, 4)),
            ],
            dim=1,
        )
        side_in = torch.cat([self.dropout(p_left - p_right), c_left - c_right], dim=1)
        return self.lvo_head(lvo_in), self.side_head(side_in), clot

    def forward(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lvo, side, _ = self.forward_with_map(volume)
        return lvo, side


def build_lvo_net() -> LvoNet:
    return LvoNet()


class LvoWithSigmoid(Served):
    """What Triton serves: (N, 1) P(LVO) and (N, 1) P(left | LVO), probabilities not logits."""

    def forward(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lvo, side = self.net(volume)
        return torch.sigmoid(lvo), torch.sigmoid(side)
