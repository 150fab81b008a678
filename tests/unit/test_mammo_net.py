"""The served mammography module's contract (models/mammo_birads/net.py), on an untrained network:
absent views give zero rows and do not count towards the study's probability."""

from __future__ import annotations

import torch

from models.mammo_birads.net import CATEGORIES, MammoServed, build_mammo_net
from processors.preprocessing import MAMMO_INPUT_SHAPE


def test_absent_views_are_zero_rows_and_the_probability_is_the_worst_present_view() -> None:
    torch.manual_seed(0)
    served = MammoServed(build_mammo_net()).eval()
    study = torch.zeros((2, *MAMMO_INPUT_SHAPE))
    study[0, 2] = torch.rand(MAMMO_INPUT_SHAPE[1:])  # LCC only
    study[1] = torch.rand(MAMMO_INPUT_SHAPE)  # all four
    with torch.no_grad():
        probability, per_view = served(study)
    assert probability.shape == (2, 1) and per_view.shape == (2, 4, CATEGORIES)
    assert torch.all(per_view[0, [0, 1, 3]] == 0)
    assert torch.allclose(per_view[0, 2].sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(per_view[1].sum(dim=1), torch.ones(4), atol=1e-5)
    suspicious = per_view[:, :, 4] + per_view[:, :, 5]
    assert torch.allclose(probability[:, 0], suspicious.amax(dim=1))
    assert torch.allclose(probability[0, 0], suspicious[0, 2])


def test_the_high_pass_of_a_flat_view_is_zero() -> None:
    net = build_mammo_net()
    flat = torch.full((1, 1, *MAMMO_INPUT_SHAPE[1:]), 0.4)
    assert torch.allclose(net.high_pass(flat), torch.zeros_like(flat), atol=1e-5)
