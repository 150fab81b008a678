"""Train the reference mammography BI-RADS model on synthetic mammograms and export it for Triton.

    python -m models.mammo_birads.train --out deploy/triton/model_repository/mammo_birads/1 --seed 0

The shape of models/cxr_triage/train.py. The network reads one view at a time
(models/mammo_birads/net.py), so it trains on single views: phantoms (models/mammo_birads/phantoms.py)
of every category the generator draws (0 incomplete, 1 negative, 2 benign, 3 probably
benign, 4 suspicious, 5 highly suggestive), balanced, on a random breast and view, through
`processors.preprocessing.preprocess_mammo_view`, the code the inference path runs. It is
judged on whole studies: four views each, written as the served module sees them
(`MammoServed`), the category decided by processors/birads.py, the code the stream runs.

* validation studies pick the operating threshold on P(BI-RADS 4 or 5) (`probability`):
  sensitivity >= 0.95, the rule of the critical routes (a missed suspicious finding is
  the costly error: a recall costs an extra view, a miss a delayed cancer);
* test studies (>= 200, balanced over categories 0-5) give the reported metrics: AUC,
  sensitivity and specificity of the flag, the category's accuracy and confusion matrix,
  the side of the finding, sensitivity per lesion kind.

Training signal: the view's category and, as an auxiliary dense target, the lesion mask at
the network's 8 x 6 feature resolution.

Writes `model.pt` (TorchScript of `MammoServed`), `config.pbtxt`, `configs/gpu.pbtxt`,
`model.onnx` + `configs/onnx.pbtxt` and `models/mammo_birads/metrics.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from models import training
from models.mammo_birads.net import (
    BLOCK_CONFIG,
    BN_SIZE,
    CATEGORIES,
    GROWTH_RATE,
    INIT_FEATURES,
    MAP_STRIDE,
    MammoServed,
    build_mammo_net,
)
from models.mammo_birads.phantoms import mammo_study_phantom, mammo_view_phantom
from models.mammo_birads.spec import SPEC
from processors.birads import assess
from processors.preprocessing import MAMMO_INPUT_SHAPE, MAMMO_VIEW_SHAPE, preprocess_mammo_view
from schemas.findings import SUSPICIOUS_CATEGORIES as SUSPICIOUS

MAP_SHAPE = tuple(n // MAP_STRIDE for n in MAMMO_VIEW_SHAPE)
MAP_POS_WEIGHT = 5.0  # a lesion fills a few per cent of the map
DRAWN = tuple(range(CATEGORIES))  # the categories the phantoms draw (6 is clinical)
VIEW_NAMES = (("R", "CC"), ("R", "MLO"), ("L", "CC"), ("L", "MLO"))
DEFAULTS = training.Defaults(train=2400, val=204, test=240, epochs=16, batch=16, lr=3e-3)


@dataclass
class ViewSet:
    x: torch.Tensor  # (n, 1, *MAMMO_VIEW_SHAPE) float16
    y: torch.Tensor  # (n,) category 0..5
    lesion: torch.Tensor  # (n, 1, *MAP_SHAPE) float16: share of each map cell that is lesion


@dataclass
class StudySet:
    x: torch.Tensor  # (n, *MAMMO_INPUT_SHAPE) float16
    category: np.ndarray  # (n,) overall category 0..5
    side: list[str | None]
    lesion: list[str]  # the lesion kind that sets the category ("none", "cutoff", ...)


def _view(args: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """One training view: its own generator from (set seed, index), so the set is the same
    however the work is split between processes; categories cycle, breast and view are random."""
    seed, index = args
    torch.set_num_threads(1)
    rng = np.random.default_rng([seed, index])
    laterality, view = VIEW_NAMES[int(rng.integers(len(VIEW_NAMES)))]
    ph = mammo_view_phantom(rng, category=DRAWN[index % len(DRAWN)], laterality=laterality, view=view)
    mask = ph.mask if ph.mask is not None else np.zeros(ph.pixels.shape, dtype=bool)
    x, m = preprocess_mammo_view(ph.pixels, ph.pixel_mm, mask)
    assert m is not None
    lesion = torch.nn.functional.avg_pool2d(torch.from_numpy(m)[None], MAP_STRIDE)[0].numpy()
    return x.astype(np.float16), lesion.astype(np.float16), ph.category


def _study(args: tuple[int, int]) -> tuple[np.ndarray, int, str | None, str]:
    seed, index = args
    torch.set_num_threads(1)
    study = mammo_study_phantom(np.random.default_rng([seed, index]), category=DRAWN[index % len(DRAWN)])
    x = np.zeros(MAMMO_INPUT_SHAPE, dtype=np.float16)
    for i, v in enumerate(study.views):
        x[i] = preprocess_mammo_view(v.pixels, v.pixel_mm)[0]
    setting = [v.lesion for v in study.views if v.category == study.category]
    return x, study.category, study.side, setting[0] if setting else "none"


def make_views(n: int, seed: int, progress: Progress, workers: int) -> ViewSet:
    xs = torch.empty((n, 1, *MAMMO_VIEW_SHAPE), dtype=torch.float16)
    ys = torch.zeros(n, dtype=torch.long)
    lesion = torch.zeros((n, 1, *MAP_SHAPE), dtype=torch.float16)
    views = training.phantoms(_view, n, seed, workers, progress, "training views", chunksize=8)
    for i, (x, m, y) in enumerate(views):
        xs[i, 0] = torch.from_numpy(x)
        lesion[i, 0] = torch.from_numpy(m)
        ys[i] = y
    return ViewSet(xs, ys, lesion)


def make_studies(n: int, seed: int, progress: Progress, label: str, workers: int) -> StudySet:
    xs = torch.empty((n, *MAMMO_INPUT_SHAPE), dtype=torch.float16)
    cats = np.zeros(n, dtype=int)
    sides: list[str | None] = []
    kinds: list[str] = []
    for i, (x, c, side, kind) in enumerate(
        training.phantoms(_study, n, seed, workers, progress, f"{label} studies")
    ):
        xs[i] = torch.from_numpy(x)
        cats[i] = c
        sides.append(side)
        kinds.append(kind)
    return StudySet(xs, cats, sides, kinds)


def predict_studies(model: torch.nn.Module, x: torch.Tensor, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The served outputs for each study: P(4 or 5) (n,) and per-view P(0..5) (n, 4, 6)."""
    probs, views = training.outputs(MammoServed(model), x, batch)
    return probs.reshape(-1).numpy().astype(np.float64), views.numpy().astype(np.float64)


def view_accuracy(model: torch.nn.Module, data: ViewSet, batch: int = 32) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(data.x), batch):
            right += int((model(data.x[i : i + batch].float()).argmax(1) == data.y[i : i + batch]).sum())
    return right / len(data.x)


def study_results(
    scores: np.ndarray, per_view: np.ndarray, data: StudySet, threshold: float
) -> dict[str, Any]:
    """Category, side and per-lesion-kind results of the studies at `threshold`."""
    suggested, sides = [], []
    for s, v in zip(scores, per_view, strict=True):
        a = assess(v, threshold, bool(s >= threshold))
        suggested.append(-1 if a is None else a.category)
        sides.append(None if a is None else a.side)
    suggested_arr = np.array(suggested)
    confusion = [[int(((data.category == t) & (suggested_arr == p)).sum()) for p in DRAWN] for t in DRAWN]
    truth_suspicious = np.isin(data.category, SUSPICIOUS)
    detected = truth_suspicious & (scores >= threshold)
    side_right = [sides[i] == data.side[i] for i in np.flatnonzero(detected)]
    kinds = sorted({k for k, s in zip(data.lesion, truth_suspicious, strict=True) if s})
    lesions = np.array(data.lesion)
    by_kind = training.sensitivity_by(
        scores,
        truth_suspicious.astype(int),
        [(k, truth_suspicious & (lesions == k)) for k in kinds],
        threshold,
    )
    return {
        "category_accuracy": round(float((suggested_arr == data.category).mean()), 4),
        "category_recall": {
            str(c): round(float((suggested_arr[data.category == c] == c).mean()), 4)
            for c in DRAWN
            if (data.category == c).any()
        },
        "confusion": confusion,
        "side_accuracy_detected": round(float(np.mean(side_right)), 4) if side_right else None,
        "by_lesion_kind": by_kind,
    }


def main(argv: list[str] | None = None) -> None:
    ap = training.arguments(
        __doc__, SPEC, DEFAULTS, train_help="training views (categories 0-5 balanced)", eval_unit="studies"
    )
    ap.add_argument("--map-weight", type=float, default=1.0, help="weight of the lesion-map loss (0 = off)")
    ap.add_argument("--flag-weight", type=float, default=1.0, help="weight of the BI-RADS 4/5 loss (0 = off)")
    args = ap.parse_args(argv)
    if training.configs_only(ap, args, SPEC, eval_unit="studies"):
        return

    with training.run(args) as r:
        train, val, test = r.split(
            lambda n, seed: make_views(n, seed, r.progress, args.workers),
            lambda n, seed, label: make_studies(n, seed, r.progress, label, args.workers),
        )
        model = build_mammo_net()
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
        map_loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(MAP_POS_WEIGHT))
        flag_loss_fn = torch.nn.BCEWithLogitsLoss()
        gen = torch.Generator().manual_seed(args.seed)
        val_y = np.isin(val.category, SUSPICIOUS).astype(int)

        def loss(idx: torch.Tensor) -> tuple[torch.Tensor, int]:
            # No left-right flips: every view is normalised chest wall left
            # (processors/mammogram.py); an up-down flip keeps that and is what a CC of the
            # other breast looks like.
            xb = training.vary_exposure(train.x[idx].float(), gen)
            lb = train.lesion[idx].float()
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb[flip] = torch.flip(xb[flip], dims=(2,))
            lb[flip] = torch.flip(lb[flip], dims=(2,))
            logits, lesion = model.forward_with_map(xb)
            # The flag the rule thresholds, P(4) + P(5), as a loss of its own: the six-way
            # loss alone spends the budget on telling 2 from 3 as much as 3 from 4.
            suspicious = torch.logsumexp(logits[:, 4:], dim=1) - torch.logsumexp(logits[:, :4], dim=1)
            yb = train.y[idx]
            total = (
                loss_fn(logits, yb)
                + args.flag_weight * flag_loss_fn(suspicious, (yb >= 4).float())
                + args.map_weight * map_loss_fn(lesion, lb)
            )
            return total, len(idx)

        validation = training.auc_epoch(
            lambda: predict_studies(model, val.x)[0], val_y, "validation AUC (BI-RADS 4/5)"
        )
        training.fit_indexed(r, model, gen, loss, validation)

    val_scores, val_views = predict_studies(model, val.x)
    chosen = training.threshold(val_scores, val_y)
    test_scores, test_views = predict_studies(model, test.x)
    test_y = np.isin(test.category, SUSPICIOUS).astype(int)
    metrics = training.finish(
        r,
        SPEC,
        MammoServed(model),
        MAMMO_INPUT_SHAPE,
        chosen=chosen,
        val=(val_scores, val_y),
        test=(test_scores, test_y),
        model=model,
        results={
            **study_results(test_scores, test_views, test, chosen),
            "val_category_accuracy": study_results(val_scores, val_views, val, chosen)["category_accuracy"],
            "train_view_accuracy": round(view_accuracy(model, train), 4),
        },
        settings={"train_unit": "views", "positives": "a third positive: BI-RADS 4 or 5"},
        described={
            "outputs": [
                "probability (P(BI-RADS 4 or 5), max over views)",
                "birads_probabilities (per view P(0..5))",
            ],
            "architecture": (
                f"monai DenseNet 2D per view, init_features {INIT_FEATURES}, growth_rate {GROWTH_RATE}, "
                f"bn_size {BN_SIZE}, block_config {list(BLOCK_CONFIG)}; view + fixed high-pass input; "
                "pooled head with a lesion map, 6 logits"
            ),
            "aux_lesion_map_weight": args.map_weight,
            "aux_flag_weight": args.flag_weight,
        },
    )
    training.report(r, metrics, "studies", f", category accuracy {metrics['category_accuracy']}")


if __name__ == "__main__":
    main()
