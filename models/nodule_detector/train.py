"""Train the reference lung-nodule detector on synthetic chest CT phantoms and export it for Triton.

    python -m models.nodule_detector.train --out deploy/triton/model_repository/nodule_detector/1 --seed 0

The shape of models/lvo_detector/train.py: phantoms (half with 1-3 nodules, half with none) are
generated from the seed and go through `processors.preprocessing.preprocess_chest_ct`,
the code the inference path runs. Three disjoint phantom sets — train, validation (picks
the study-level operating threshold: sensitivity >= 0.95), test (>= 200 studies, the
reported metrics, never used to choose anything).

Training signal: the nodule masks resampled onto the model grid (partial-volume
fractions), on 48^3 patches: half centred on a nodule, a quarter on a vessel voxel (the
mimic: a hard negative), a quarter anywhere in the lung; left-right flips. Loss: binary
cross-entropy (keeps the map calibrated, so its sum is a volume) + soft Dice over the
batch (a 5 mm nodule is 8 voxels of a 110 k-voxel patch; Dice keeps it from being
drowned).

Evaluation on the whole grid, as served: study AUC, sensitivity and specificity at the
validation threshold; per nodule, `processors.nodules.find_nodules` at that threshold, a
detection within max(5 mm, radius) of a true centre counting as found: sensitivity
overall, by size and kind, false positives per study, centre and diameter errors.

Writes `model.pt` (TorchScript: P(nodule) and the nodule map) and `model.onnx` into the
Triton model version directory, `config.pbtxt`, `configs/gpu.pbtxt`, `configs/onnx.pbtxt`
and `models/nodule_detector/metrics.json`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.losses import DiceLoss
from rich.progress import Progress

from models import training
from models.nodule_detector.net import MODEL_CHANNELS, NoduleWithSigmoid, build_nodule_net
from models.nodule_detector.phantoms import chest_ct_phantom
from models.nodule_detector.spec import SPEC
from models.operating_point import (
    auc,
)
from models.training import console
from processors.nodules import DetectedNodule, NoduleGeometry, find_nodules
from processors.preprocessing import NODULE_GRID_MM, NODULE_INPUT_SHAPE, preprocess_chest_ct_with_mask

PATCH = 48
# Hard-negative candidates: lung voxels at least this bright in the lung window (vessels,
# ~-250 HU and up, partial volume included) and no nodule.
VESSEL_LEVEL = 0.62
CANDIDATES = 48  # per study and kind (vessel, lung)
MATCH_MIN_MM = 5.0
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("<6", 0.0, 6.0),
    ("6-10", 6.0, 10.0),
    ("10-20", 10.0, 20.0),
    (">=20", 20.0, math.inf),
)
DEFAULTS = training.Defaults(train=480, val=200, test=200, epochs=16, batch=8, lr=3e-3)


@dataclass(frozen=True)
class TrueNodule:
    kind: str
    site: str
    diameter_mm: float
    centre_lps_mm: tuple[float, float, float]


@dataclass
class ChestSet:
    x: torch.Tensor  # (n, *NODULE_INPUT_SHAPE) float16
    target: torch.Tensor  # (n, 1, D, H, W) float16: nodule fraction per voxel
    y: np.ndarray  # (n,) 1 = at least one nodule
    geometry: list[NoduleGeometry]
    nodules: list[list[TrueNodule]]
    # Patch centres (k, 3) per study: nodule centres, vessel voxels, lung voxels.
    at_nodules: list[np.ndarray]
    at_vessels: list[np.ndarray]
    at_lung: list[np.ndarray]


Study = tuple[np.ndarray, np.ndarray, NoduleGeometry, list[TrueNodule], np.ndarray, np.ndarray, np.ndarray]


def _study(args: tuple[int, int]) -> Study:
    """One study of a set: phantom `index` of the set seeded `seed` (its own generator, so
    the sets are the same however the work is split between processes). Odd indices have
    1-3 nodules, even ones none."""
    seed, index = args
    torch.set_num_threads(1)
    rng = np.random.default_rng([seed, index])
    count = int(rng.integers(1, 4)) if index % 2 else 0
    ph = chest_ct_phantom(rng, nodules=count)
    x, target, geometry = preprocess_chest_ct_with_mask(ph.hu, ph.spacing_zyx, ph.mask())
    truths = [TrueNodule(n.kind, n.site, n.diameter_mm, n.centre_lps_mm) for n in ph.nodules]
    centres = np.array([geometry.to_index(n.centre_lps_mm) for n in ph.nodules]).reshape(-1, 3)
    lung = x[1] > 0.5
    vessel = np.argwhere(lung & (x[0] > VESSEL_LEVEL) & (target < 0.01))
    inside = np.argwhere(lung)
    pick = np.random.default_rng([seed, index, 1])

    def sample(points: np.ndarray) -> np.ndarray:
        if len(points) == 0:
            return np.zeros((0, 3), dtype=np.int16)
        return points[pick.choice(len(points), size=min(CANDIDATES, len(points)), replace=False)].astype(
            np.int16
        )

    return (
        x.astype(np.float16),
        target.astype(np.float16),
        geometry,
        truths,
        np.round(centres).astype(np.int16),
        sample(vessel),
        sample(inside),
    )


def make_set(n: int, seed: int, progress: Progress, label: str, workers: int) -> ChestSet:
    xs = torch.empty((n, *NODULE_INPUT_SHAPE), dtype=torch.float16)
    targets = torch.empty((n, 1, *NODULE_INPUT_SHAPE[1:]), dtype=torch.float16)
    data = ChestSet(xs, targets, np.zeros(n), [], [], [], [], [])
    studies = training.phantoms(_study, n, seed, workers, progress, label, chunksize=2)
    for i, (x, target, geometry, truths, at_n, at_v, at_l) in enumerate(studies):
        xs[i] = torch.from_numpy(x)
        targets[i, 0] = torch.from_numpy(target)
        data.y[i] = float(bool(truths))
        data.geometry.append(geometry)
        data.nodules.append(truths)
        data.at_nodules.append(at_n)
        data.at_vessels.append(at_v)
        data.at_lung.append(at_l)
    return data


def _patch_start(centre: np.ndarray, rng: np.random.Generator, jitter: int) -> tuple[int, int, int]:
    dims = NODULE_INPUT_SHAPE[1:]
    start = np.asarray(centre) - PATCH // 2 + rng.integers(-jitter, jitter + 1, 3)
    start = np.clip(start, 0, np.asarray(dims) - PATCH)
    return int(start[0]), int(start[1]), int(start[2])


def sample_batch(data: ChestSet, batch: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the patches on a nodule (jittered, so it is not always in the middle), a
    quarter on a vessel voxel, a quarter anywhere in the lung; random left-right flips."""
    n = len(data.y)
    positives = [i for i in range(n) if len(data.at_nodules[i])]
    xs, ts = [], []
    for b in range(batch):
        kind = "nodule" if b < batch // 2 else ("vessel" if b < 3 * batch // 4 else "lung")
        i = int(rng.choice(positives)) if kind == "nodule" else int(rng.integers(n))
        points = {"nodule": data.at_nodules, "vessel": data.at_vessels, "lung": data.at_lung}[kind][i]
        if len(points) == 0:
            points = data.at_lung[i]
        centre = (
            points[int(rng.integers(len(points)))] if len(points) else np.asarray(NODULE_INPUT_SHAPE[1:]) // 2
        )
        z, y, x = _patch_start(centre, rng, 12 if kind == "nodule" else 4)
        window = (slice(z, z + PATCH), slice(y, y + PATCH), slice(x, x + PATCH))
        xp, tp = data.x[i][(slice(None), *window)], data.target[i][(slice(None), *window)]
        if rng.random() < 0.5:
            xp, tp = torch.flip(xp, dims=(-1,)), torch.flip(tp, dims=(-1,))
        xs.append(xp)
        ts.append(tp)
    return torch.stack(xs).float(), torch.stack(ts).float()


def predict_maps(served: torch.nn.Module, x: torch.Tensor, batch: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(P(nodule) per study, float16 maps (n, D, H, W)) on whole grids, as served."""
    served.eval()
    probs, maps = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            p, m = served(x[i : i + batch].float())
            probs.append(p.reshape(-1))
            maps.append(m[:, 0].half())
    return torch.cat(probs).numpy(), torch.cat(maps).numpy()


def match(
    found: list[DetectedNodule], truths: list[TrueNodule]
) -> tuple[list[DetectedNodule | None], int, int]:
    """Each true nodule's detection (or None), false positives and duplicates. A detection
    hits a nodule within max(5 mm, its radius) of the true centre; detections are taken
    likeliest first, each nodule once; a second hit on a found nodule is a duplicate, not a
    false positive (it points at a real nodule)."""
    hit: list[DetectedNodule | None] = [None] * len(truths)
    fp = duplicates = 0
    for det in found:
        p = np.asarray(det.centre_lps_mm)
        dist = [float(np.linalg.norm(p - np.asarray(t.centre_lps_mm))) for t in truths]
        within = [j for j, t in enumerate(truths) if dist[j] <= max(MATCH_MIN_MM, t.diameter_mm / 2)]
        free = [j for j in within if hit[j] is None]
        if free:
            hit[min(free, key=lambda j: dist[j])] = det
        elif within:
            duplicates += 1
        else:
            fp += 1
    return hit, fp, duplicates


def nodule_metrics(maps: np.ndarray, data: ChestSet, threshold: float) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    fps, dups = [], 0
    for i in range(len(maps)):
        found = find_nodules(maps[i].astype(np.float32), data.geometry[i], threshold)
        hit, fp, dup = match(found, data.nodules[i])
        fps.append(fp)
        dups += dup
        for t, det in zip(data.nodules[i], hit, strict=True):
            row: dict[str, Any] = {
                "kind": t.kind,
                "site": t.site,
                "diameter": t.diameter_mm,
                "found": det is not None,
            }
            if det is not None:
                row["centre_error"] = float(np.linalg.norm(np.subtract(det.centre_lps_mm, t.centre_lps_mm)))
                row["diameter_error"] = abs(det.diameter_mm - t.diameter_mm)
            rows.append(row)

    def sens(sel: list[dict[str, Any]]) -> dict[str, float]:
        return {
            "n": len(sel),
            "sensitivity": round(float(np.mean([r["found"] for r in sel])), 4) if sel else math.nan,
        }

    found_rows = [r for r in rows if r["found"]]
    negatives = [fps[i] for i in range(len(fps)) if data.y[i] == 0]
    return {
        "nodules": len(rows),
        "sensitivity": round(float(np.mean([r["found"] for r in rows])), 4) if rows else math.nan,
        "sensitivity_ge_6mm": sens([r for r in rows if r["diameter"] >= 6.0])["sensitivity"],
        "by_size_mm": {
            name: sens([r for r in rows if lo <= r["diameter"] < hi]) for name, lo, hi in SIZE_BINS
        },
        "by_kind": {k: sens([r for r in rows if r["kind"] == k]) for k in ("solid", "ground_glass")},
        "by_site": {
            s: sens([r for r in rows if r["site"] == s])
            for s in ("parenchymal", "juxta_pleural", "juxta_vascular")
        },
        "false_positives_per_study": round(float(np.mean(fps)), 4),
        "false_positives_per_normal_study": round(float(np.mean(negatives)), 4) if negatives else math.nan,
        "duplicate_detections": dups,
        "median_centre_error_mm": round(float(np.median([r["centre_error"] for r in found_rows])), 3)
        if found_rows
        else math.nan,
        "median_abs_diameter_error_mm": round(float(np.median([r["diameter_error"] for r in found_rows])), 3)
        if found_rows
        else math.nan,
    }


def main(argv: list[str] | None = None) -> None:
    ap = training.arguments(
        __doc__,
        SPEC,
        DEFAULTS,
        train_help="training phantoms (half with nodules)",
        batch_help="patches per step",
    )
    ap.add_argument("--steps", type=int, default=120, help="optimiser steps per epoch")
    ap.add_argument(
        "--dice",
        choices=("batch", "patch"),
        default="batch",
        help="soft Dice over the whole batch, or per patch (each patch counts the same, so a "
        "patch on a 6 mm nodule weighs as much as one on a 25 mm nodule)",
    )
    args = ap.parse_args(argv)
    if training.configs_only(ap, args, SPEC):
        return

    with training.run(args) as r:
        train, val, test = r.phantom_sets(make_set)
        model = build_nodule_net()
        served = NoduleWithSigmoid(model)
        bce = torch.nn.BCEWithLogitsLoss()
        dice = DiceLoss(sigmoid=True, batch=args.dice == "batch", smooth_nr=1.0, smooth_dr=1.0)
        rng = np.random.default_rng([args.seed, 42])
        fit_started = time.time()

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for _ in range(args.steps):
                yield sample_batch(train, args.batch, rng)

        def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
            xb, tb = batch
            logits = model(xb)
            return bce(logits, tb) + dice(logits, tb), 1

        def after_epoch(epoch: int, train_loss: float) -> dict[str, float]:
            # A quick look on a slice of validation (whole grids are the expensive part).
            probe = slice(0, min(32, args.val))
            p_val, _ = predict_maps(served, val.x[probe])
            val_auc = auc(p_val, val.y[probe])
            console.log(
                f"epoch {epoch}: train loss {train_loss:.4f}, validation AUC (32 studies) "
                f"{val_auc:.4f} ({time.time() - fit_started:.0f} s)"
            )
            return {"epoch": epoch, "train_loss": round(train_loss, 5), "val_auc_32": round(val_auc, 4)}

        training.fit(
            r,
            model,
            steps_per_epoch=args.steps,
            batches=batches,
            loss=loss,
            after_epoch=after_epoch,
            items_per_epoch=args.steps,
            pct_start=0.1,
        )

    val_p, val_maps = predict_maps(served, val.x)
    chosen = training.threshold(val_p, val.y)
    val_nodules = nodule_metrics(val_maps, val, chosen)
    del val_maps
    test_p, test_maps = predict_maps(served, test.x)
    test_nodules = nodule_metrics(test_maps, test, chosen)
    metrics = training.finish(
        r,
        SPEC,
        served,
        NODULE_INPUT_SHAPE,
        chosen=chosen,
        val=(val_p, val.y),
        test=(test_p, test.y),
        model=model,
        results={
            "nodule_detection": test_nodules,
            "match_rule": f"a detection within max({MATCH_MIN_MM:g} mm, true radius) of a true centre",
            "val_nodule_detection": val_nodules,
        },
        settings={
            "test_studies_with_nodules": int(test.y.sum()),
            "steps_per_epoch": args.steps,
            "patch": [PATCH] * 3,
            "loss": f"BCE + soft Dice ({args.dice}), on nodule partial-volume fractions",
        },
        described={
            "grid_mm": NODULE_GRID_MM,
            "outputs": [
                "probability (P(nodule in study) = max of the map)",
                "nodule_map (P(nodule) per voxel)",
            ],
            "channels": list(MODEL_CHANNELS),
        },
    )
    nd = test_nodules
    training.report(
        r,
        metrics,
        "phantoms",
        f"; nodules found {nd['sensitivity']} (>= 6 mm {nd['sensitivity_ge_6mm']}), "
        f"{nd['false_positives_per_study']} FP/study, centre error {nd['median_centre_error_mm']} mm, "
        f"|diameter error| {nd['median_abs_diameter_error_mm']} mm",
    )


if __name__ == "__main__":
    main()
