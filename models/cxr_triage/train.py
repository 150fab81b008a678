"""Train the reference chest X-ray triage model on synthetic radiographs and export it for Triton.

    python -m models.cxr_triage.train --out deploy/triton/model_repository/cxr_triage/1 --seed 0

The shape of models/ich_classifier/train.py: phantoms (half with a pneumothorax, on a random side)
are generated from the seed and go through `processors.preprocessing.preprocess_radiograph`,
the code the inference path runs. Three disjoint sets: train (small intensity
augmentation: gamma and contrast, as exposure and vendor processing vary; no flips —
the heart is on the left), validation (picks the operating threshold: sensitivity >=
0.95, the same rule as the critical CT routes: a missed pneumothorax is the costly
error), test (>= 200 studies, the reported metrics).

Training signal: the image label and, as an auxiliary dense target, the pneumothorax mask
at the network's 8 x 8 feature resolution (models/cxr_triage/net.py).

Writes `model.pt` (TorchScript of network + sigmoid), `config.pbtxt`,
`configs/gpu.pbtxt` and `models/cxr_triage/metrics.json`. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import Progress

from models import training
from models.cxr_triage.net import (
    BLOCK_CONFIG,
    BN_SIZE,
    GROWTH_RATE,
    INIT_FEATURES,
    MAP_STRIDE,
    CxrWithSigmoid,
    build_cxr_net,
)
from models.cxr_triage.phantoms import chest_radiograph_phantom
from models.cxr_triage.spec import SPEC
from processors.preprocessing import CXR_INPUT_SHAPE, preprocess_radiograph, preprocess_radiograph_with_mask

MAP_SHAPE = tuple(n // MAP_STRIDE for n in CXR_INPUT_SHAPE[1:])
MAP_POS_WEIGHT = 5.0  # pleural air fills a few per cent of the map
SIZE_BINS = (("<10 % rim", 0.0, 0.10), ("10-20 % rim", 0.10, 0.20), (">=20 % rim", 0.20, 1.0))
DEFAULTS = training.Defaults(train=900, val=250, test=250, epochs=10, batch=16, lr=3e-3)


@dataclass
class CxrSet:
    x: torch.Tensor  # (n, *CXR_INPUT_SHAPE) float16
    y: torch.Tensor  # (n,) 1 = pneumothorax
    air: torch.Tensor  # (n, 1, *MAP_SHAPE) float16: share of each map cell that is pleural air
    rim: np.ndarray  # (n,) rim fraction, 0 for normals


def _phantom(args: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """One study of a set: its own generator from (set seed, index), so the set is the same
    however the work is split between processes."""
    seed, index = args
    torch.set_num_threads(1)
    ph = chest_radiograph_phantom(np.random.default_rng([seed, index]), pneumothorax=bool(index % 2))
    if ph.mask is None:
        x = preprocess_radiograph(ph.pixels, ph.pixel_mm)
        air = np.zeros(MAP_SHAPE, dtype=np.float32)
    else:
        x, mask = preprocess_radiograph_with_mask(ph.pixels, ph.pixel_mm, ph.mask)
        air = torch.nn.functional.avg_pool2d(torch.from_numpy(mask)[None], MAP_STRIDE)[0].numpy()
    return x.astype(np.float16), air.astype(np.float16), float(ph.has_pneumothorax), ph.rim_fraction


def make_set(n: int, seed: int, progress: Progress, label: str, workers: int) -> CxrSet:
    xs = torch.empty((n, *CXR_INPUT_SHAPE), dtype=torch.float16)
    ys = torch.zeros(n)
    air = torch.zeros((n, 1, *MAP_SHAPE), dtype=torch.float16)
    rim = np.zeros(n)
    for i, (x, a, y, r) in enumerate(
        training.phantoms(_phantom, n, seed, workers, progress, label, chunksize=8)
    ):
        xs[i] = torch.from_numpy(x)
        air[i, 0] = torch.from_numpy(a)
        ys[i], rim[i] = y, r
    return CxrSet(xs, ys, air, rim)


def by_size(scores: np.ndarray, data: CxrSet, threshold: float) -> dict[str, dict[str, float]]:
    y = data.y.numpy()
    sizes = [(name, (y == 1) & (data.rim >= lo) & (data.rim < hi)) for name, lo, hi in SIZE_BINS]
    return training.sensitivity_by(scores, y, sizes, threshold)


def main(argv: list[str] | None = None) -> None:
    ap = training.arguments(
        __doc__, SPEC, DEFAULTS, train_help="training phantoms (half with a pneumothorax)"
    )
    ap.add_argument("--map-weight", type=float, default=1.0, help="weight of the air-map loss (0 = off)")
    args = ap.parse_args(argv)
    if training.configs_only(ap, args, SPEC):
        return

    with training.run(args) as r:
        train, val, test = r.phantom_sets(make_set)
        model = build_cxr_net()
        loss_fn = torch.nn.BCEWithLogitsLoss()
        map_loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(MAP_POS_WEIGHT))
        gen = torch.Generator().manual_seed(args.seed)

        def loss(idx: torch.Tensor) -> tuple[torch.Tensor, int]:
            xb = training.vary_exposure(train.x[idx].float(), gen)
            logits, air = model.forward_with_map(xb)
            total = loss_fn(logits.reshape(-1), train.y[idx]) + args.map_weight * map_loss_fn(
                air, train.air[idx].float()
            )
            return total, len(idx)

        validation = training.auc_epoch(lambda: training.predict(model, val.x), val.y.numpy())
        training.fit_indexed(r, model, gen, loss, validation)

    val_scores = training.predict(model, val.x)
    chosen = training.threshold(val_scores, val.y.numpy())
    test_scores = training.predict(model, test.x)
    metrics = training.finish(
        r,
        SPEC,
        CxrWithSigmoid(model),
        CXR_INPUT_SHAPE,
        chosen=chosen,
        val=(val_scores, val.y.numpy()),
        test=(test_scores, test.y.numpy()),
        model=model,
        results={"by_rim_size": by_size(test_scores, test, chosen)},
        settings={},
        described={
            "outputs": ["probability (P(pneumothorax))"],
            "architecture": (
                f"monai DenseNet 2D, init_features {INIT_FEATURES}, growth_rate {GROWTH_RATE}, "
                f"bn_size {BN_SIZE}, block_config {list(BLOCK_CONFIG)}; pooled head with an air map"
            ),
            "aux_air_map_weight": args.map_weight,
        },
    )
    training.report(r, metrics, "phantoms")


if __name__ == "__main__":
    main()
