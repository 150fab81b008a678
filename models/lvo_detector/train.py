"""Train the reference LVO detector on synthetic CTA phantoms and export it for Triton.

    python -m models.lvo_detector.train --out deploy/triton/model_repository/lvo_detector/1 --seed 0

The shape of models/ich_classifier/train.py: phantoms (half with an occlusion, on a random side)
are generated from the seed and go through `processors.preprocessing.preprocess_cta`,
the code the inference path runs. Three disjoint phantom sets — train (left-right flips
as augmentation, which swap the side label), validation (picks the operating threshold:
sensitivity >= 0.95), test (>= 200 studies, the reported metrics, never used to choose
anything).

Training signal: the study label (LVO or not), the side (left/right, LVO studies only)
and, as an auxiliary dense target, the clot mask at the network's stage-1 resolution.

Writes `model.pt` (TorchScript of network + sigmoids: P(LVO) and P(left) out) into the
Triton model version directory, the model's `config.pbtxt` and `configs/gpu.pbtxt`, and
`models/lvo_detector/metrics.json`. About 6-7 minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import Progress

from models import training
from models.lvo_detector.net import MODEL_CHANNELS, LvoWithSigmoid, build_lvo_net
from models.lvo_detector.phantoms import OCCLUSION_SITES, cta_phantom
from models.lvo_detector.spec import SPEC
from models.operating_point import (
    auc,
)
from models.training import console
from processors.preprocessing import LVO_INPUT_SHAPE, preprocess_cta, preprocess_cta_with_mask

MAP_POOL = (2, 4, 4)
MAP_SHAPE = tuple(n // p for n, p in zip(LVO_INPUT_SHAPE[1:], MAP_POOL, strict=True))
MAP_POS_WEIGHT = 20.0
ASYMMETRY_CHANNEL = 2  # processors/preprocessing/, CTA step 5  # clot fills well under 1 % of the map
DEFAULTS = training.Defaults(train=600, val=200, test=200, epochs=6, batch=4, lr=2e-3)


@dataclass
class CtaSet:
    x: torch.Tensor  # (n, *LVO_INPUT_SHAPE) float16
    y: torch.Tensor  # (n,) 1 = LVO
    left: torch.Tensor  # (n,) 1 = left-sided LVO (0 for right and for normals; masked by y)
    clot: torch.Tensor  # (n, 1, *MAP_SHAPE) float16, clot presence per map cell
    site: list[str]  # "none" or an OCCLUSION_SITES entry


def _phantom(args: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, float, float, str]:
    """One study of a set: phantom `index` of the set seeded `seed` (its own generator, so
    the sets are the same however the work is split between processes)."""
    seed, index = args
    torch.set_num_threads(1)
    rng = np.random.default_rng([seed, index])
    ph = cta_phantom(rng, lvo=bool(index % 2))
    if ph.occlusion_mask is None:
        x = preprocess_cta(ph.hu, ph.spacing_zyx)
        clot = np.zeros(MAP_SHAPE, dtype=np.float16)
    else:
        x, mask = preprocess_cta_with_mask(ph.hu, ph.spacing_zyx, ph.occlusion_mask)
        clot = torch.nn.functional.max_pool3d(torch.from_numpy(mask)[None], MAP_POOL)[0].numpy()
    site = ph.occlusion.site if ph.occlusion else "none"
    return x.astype(np.float16), clot.astype(np.float16), float(ph.has_lvo), float(ph.side == "left"), site


def make_set(n: int, seed: int, progress: Progress, label: str, workers: int) -> CtaSet:
    xs = torch.empty((n, *LVO_INPUT_SHAPE), dtype=torch.float16)
    ys, left = torch.zeros(n), torch.zeros(n)
    maps = torch.zeros((n, 1, *MAP_SHAPE), dtype=torch.float16)
    sites: list[str] = []
    for i, (x, clot, y, is_left, site) in enumerate(
        training.phantoms(_phantom, n, seed, workers, progress, label)
    ):
        xs[i] = torch.from_numpy(x)
        maps[i, 0] = torch.from_numpy(clot)
        ys[i], left[i] = y, is_left
        sites.append(site)
    return CtaSet(xs, ys, left, maps, sites)


def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(P(LVO), P(left)) for a whole set."""
    lvo, side = training.outputs(model, x, batch)
    return torch.sigmoid(lvo).reshape(-1).numpy(), torch.sigmoid(side).reshape(-1).numpy()


def side_metrics(p_lvo: np.ndarray, p_left: np.ndarray, data: CtaSet, threshold: float) -> dict[str, float]:
    """How well the side is called on LVO studies: AUC of P(left) left vs right, accuracy at
    0.5 on all LVOs and on those detected at the threshold."""
    y, left = data.y.numpy() == 1, data.left.numpy() == 1
    called_left = p_left >= 0.5
    detected = y & (p_lvo >= threshold)
    return {
        "side_auc": round(auc(p_left[y], left[y].astype(float)), 4),
        "side_accuracy": round(float((called_left[y] == left[y]).mean()), 4),
        "side_accuracy_detected": round(float((called_left[detected] == left[detected]).mean()), 4)
        if detected.any()
        else float("nan"),
    }


def by_site(p_lvo: np.ndarray, data: CtaSet, threshold: float) -> dict[str, dict[str, float]]:
    sites = np.array(data.site)
    return training.sensitivity_by(
        p_lvo, data.y.numpy(), [(s, sites == s) for s in OCCLUSION_SITES], threshold
    )


def main(argv: list[str] | None = None) -> None:
    ap = training.arguments(__doc__, SPEC, DEFAULTS, train_help="training phantoms (half with an LVO)")
    ap.add_argument("--map-weight", type=float, default=1.0, help="weight of the clot-map loss (0 = off)")
    ap.add_argument("--side-weight", type=float, default=0.5, help="weight of the side loss")
    args = ap.parse_args(argv)
    if training.configs_only(ap, args, SPEC):
        return

    with training.run(args) as r:
        train, val, test = r.phantom_sets(make_set)
        model = build_lvo_net()
        bce = torch.nn.BCEWithLogitsLoss()
        side_bce = torch.nn.BCEWithLogitsLoss(reduction="none")
        map_bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(MAP_POS_WEIGHT))
        gen = torch.Generator().manual_seed(args.seed)

        def loss(idx: torch.Tensor) -> tuple[torch.Tensor, int]:
            xb, mb = train.x[idx].float(), train.clot[idx].float()
            yb, lb = train.y[idx], train.left[idx].clone()
            # Left-right flips: an occlusion is as likely on either side; the side flips with
            # it, and the asymmetry channel (this side minus the mirror side) changes sign.
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb[flip] = torch.flip(xb[flip], dims=(-1,))
            xb[flip, ASYMMETRY_CHANNEL] = -xb[flip, ASYMMETRY_CHANNEL]
            mb[flip] = torch.flip(mb[flip], dims=(-1,))
            lb[flip] = 1.0 - lb[flip]
            lvo, side, clot = model.forward_with_map(xb)
            side_loss = (side_bce(side.reshape(-1), lb) * yb).sum() / yb.sum().clamp(min=1.0)
            total = (
                bce(lvo.reshape(-1), yb) + args.side_weight * side_loss + args.map_weight * map_bce(clot, mb)
            )
            return total, len(idx)

        def after_epoch(epoch: int, train_loss: float) -> dict[str, float]:
            v_lvo, v_left = predict(model, val.x)
            val_auc = auc(v_lvo, val.y.numpy())
            val_side = side_metrics(v_lvo, v_left, val, 0.5)
            console.log(
                f"epoch {epoch}: train loss {train_loss:.4f}, validation AUC {val_auc:.4f}, "
                f"side accuracy {val_side['side_accuracy']:.3f}"
            )
            return {
                "epoch": epoch,
                "train_loss": round(train_loss, 5),
                "val_auc": round(val_auc, 5),
                "val_side_accuracy": val_side["side_accuracy"],
            }

        training.fit_indexed(r, model, gen, loss, after_epoch)

    val_lvo, _ = predict(model, val.x)
    chosen = training.threshold(val_lvo, val.y.numpy())
    test_lvo, test_left = predict(model, test.x)
    metrics = training.finish(
        r,
        SPEC,
        LvoWithSigmoid(model),
        LVO_INPUT_SHAPE,
        chosen=chosen,
        val=(val_lvo, val.y.numpy()),
        test=(test_lvo, test.y.numpy()),
        model=model,
        results={
            **side_metrics(test_lvo, test_left, test, chosen),
            "by_site": by_site(test_lvo, test, chosen),
        },
        settings={"aux_clot_map_weight": args.map_weight, "side_weight": args.side_weight},
        described={
            "outputs": ["probability (P(LVO))", "side_left_probability (P(left | LVO))"],
            "channels": list(MODEL_CHANNELS),
        },
    )
    training.report(r, metrics, "phantoms", f", side accuracy {metrics['side_accuracy']}")


if __name__ == "__main__":
    main()
