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

import argparse
import contextlib
import json
import multiprocessing
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from models.lvo_detector.net import MODEL_CHANNELS, LvoWithSigmoid, build_lvo_net
from models.lvo_detector.phantoms import OCCLUSION_SITES, cta_phantom
from models.onnx_export import export_onnx
from models.operating_point import (
    TARGET_SENSITIVITY,
    TEST_SEED_OFFSET,
    THRESHOLD_RULE,
    VAL_SEED_OFFSET,
    auc,
    choose_threshold,
    operating_point,
)
from models.serving import committed_operating_point, export_torchscript, write_triton_configs
from processors.preprocessing import LVO_INPUT_SHAPE, preprocess_cta, preprocess_cta_with_mask

console = Console()
REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "lvo_detector"
DEFAULT_OUT = REPO / "deploy" / "triton" / "model_repository" / MODEL_NAME / "1"
DEFAULT_METRICS = REPO / "models" / MODEL_NAME / "metrics.json"
MAP_POOL = (2, 4, 4)
MAP_SHAPE = tuple(n // p for n, p in zip(LVO_INPUT_SHAPE[1:], MAP_POOL, strict=True))
MAP_POS_WEIGHT = 20.0
ASYMMETRY_CHANNEL = 2  # processors/preprocessing.py, CTA step 5  # clot fills well under 1 % of the map
DISPLAY_NAME = "radtriage reference LVO detector (synthetic phantoms, not for clinical use)"


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
    task = progress.add_task(f"phantoms: {label}", total=n)
    jobs = [(seed, i) for i in range(n)]
    # Phantoms are numpy work on one core each: a process per core halves the wait.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(_phantom, jobs, chunksize=4) if pool is not None else map(_phantom, jobs)
        for i, (x, clot, y, is_left, site) in enumerate(results):
            xs[i] = torch.from_numpy(x)
            maps[i, 0] = torch.from_numpy(clot)
            ys[i], left[i] = y, is_left
            sites.append(site)
            progress.advance(task)
    return CtaSet(xs, ys, left, maps, sites)


def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(P(LVO), P(left)) for a whole set, in eval mode."""
    model.eval()
    lvo, side = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            a, b = model(x[i : i + batch].float())
            lvo.append(torch.sigmoid(a).reshape(-1))
            side.append(torch.sigmoid(b).reshape(-1))
    return torch.cat(lvo).numpy(), torch.cat(side).numpy()


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
    y = data.y.numpy()
    sites = np.array(data.site)
    out: dict[str, dict[str, float]] = {}
    for site in OCCLUSION_SITES:
        m = sites == site
        if m.any():
            sub = m | (y == 0)
            out[site] = {
                "n": int(m.sum()),
                "sensitivity": round(float((p_lvo[m] >= threshold).mean()), 4),
                "auc_vs_normals": round(auc(p_lvo[sub], y[sub]), 4),
            }
    return out


def write_configs(model_dir: Path, threshold: float, version: str, rule: str) -> list[Path]:
    """config.pbtxt (KIND_CPU) and configs/gpu.pbtxt (KIND_GPU) from TRITON_CONFIG."""
    return write_triton_configs(
        model_dir,
        template=TRITON_CONFIG,
        input_shape=LVO_INPUT_SHAPE,
        threshold=threshold,
        version=version,
        rule=rule,
        display=DISPLAY_NAME,
    )


def write_configs_only(out: Path = DEFAULT_OUT, metrics_path: Path = DEFAULT_METRICS) -> list[Path]:
    """The Triton configs of the committed model, without training (`--configs-only`)."""
    threshold, version, rule = committed_operating_point(metrics_path, out.parent.name)
    return write_configs(out.parent, threshold, version=version, rule=rule)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Triton model version directory")
    ap.add_argument("--metrics", type=Path, default=DEFAULT_METRICS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=600, help="training phantoms (half with an LVO)")
    ap.add_argument("--val", type=int, default=200, help="validation phantoms (threshold choice)")
    ap.add_argument("--test", type=int, default=200, help="held-out test phantoms (reported metrics)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="processes generating phantoms")
    ap.add_argument("--map-weight", type=float, default=1.0, help="weight of the clot-map loss (0 = off)")
    ap.add_argument("--side-weight", type=float, default=0.5, help="weight of the side loss")
    ap.add_argument(
        "--configs-only",
        action="store_true",
        help="no training: rewrite config.pbtxt and configs/gpu.pbtxt of the committed model "
        "(threshold and version from --metrics)",
    )
    args = ap.parse_args(argv)
    if args.configs_only:
        for path in write_configs_only(args.out, args.metrics):
            console.print(f"wrote {path}")
        return
    if args.test < 200:
        ap.error("--test must be at least 200 phantoms for the reported metrics to mean much")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.time()
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        train = make_set(args.train, args.seed, progress, "train", args.workers)
        val = make_set(args.val, args.seed + VAL_SEED_OFFSET, progress, "validation", args.workers)
        test = make_set(args.test, args.seed + TEST_SEED_OFFSET, progress, "test", args.workers)
        data_seconds = time.time() - started

        model = build_lvo_net()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
        steps_per_epoch = (args.train + args.batch - 1) // args.batch
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
        )
        bce = torch.nn.BCEWithLogitsLoss()
        side_bce = torch.nn.BCEWithLogitsLoss(reduction="none")
        map_bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(MAP_POS_WEIGHT))
        gen = torch.Generator().manual_seed(args.seed)
        history: list[dict[str, float]] = []
        for epoch in range(args.epochs):
            model.train()
            order = torch.randperm(args.train, generator=gen)
            total = 0.0
            task = progress.add_task(f"  epoch {epoch + 1}", total=args.train)
            for i in range(0, args.train, args.batch):
                idx = order[i : i + args.batch]
                xb, mb = train.x[idx].float(), train.clot[idx].float()
                yb, lb = train.y[idx], train.left[idx].clone()
                # Left-right flips: an occlusion is as likely on either side; the side flips with
                # it, and the asymmetry channel (this side minus the mirror side) changes sign.
                flip = torch.rand(len(idx), generator=gen) < 0.5
                xb[flip] = torch.flip(xb[flip], dims=(-1,))
                xb[flip, ASYMMETRY_CHANNEL] = -xb[flip, ASYMMETRY_CHANNEL]
                mb[flip] = torch.flip(mb[flip], dims=(-1,))
                lb[flip] = 1.0 - lb[flip]
                opt.zero_grad(set_to_none=True)
                lvo, side, clot = model.forward_with_map(xb)
                side_loss = (side_bce(side.reshape(-1), lb) * yb).sum() / yb.sum().clamp(min=1.0)
                loss = (
                    bce(lvo.reshape(-1), yb)
                    + args.side_weight * side_loss
                    + args.map_weight * map_bce(clot, mb)
                )
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                progress.advance(task, len(idx))
            progress.remove_task(task)
            v_lvo, v_left = predict(model, val.x)
            val_auc = auc(v_lvo, val.y.numpy())
            val_side = side_metrics(v_lvo, v_left, val, 0.5)
            train_loss = total / args.train
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": round(train_loss, 5),
                    "val_auc": round(val_auc, 5),
                    "val_side_accuracy": val_side["side_accuracy"],
                }
            )
            console.log(
                f"epoch {epoch + 1}: train loss {train_loss:.4f}, validation AUC {val_auc:.4f}, "
                f"side accuracy {val_side['side_accuracy']:.3f}"
            )

    val_lvo, _ = predict(model, val.x)
    threshold = choose_threshold(val_lvo, val.y.numpy(), TARGET_SENSITIVITY)
    test_lvo, test_left = predict(model, test.x)
    test_point = operating_point(test_lvo, test.y.numpy(), threshold)
    path = export_torchscript(LvoWithSigmoid(model), LVO_INPUT_SHAPE, args.out)
    configs = write_configs(args.out.parent, threshold, version=args.out.name, rule=THRESHOLD_RULE)
    configs += export_onnx(args.out.parent, version=args.out.name)[:2]
    training_seconds = time.time() - started

    metrics: dict[str, Any] = {
        "model": args.out.parent.name,
        "version": args.out.name,
        "finding": "LVO",
        "threshold": round(threshold, 4),
        "threshold_rule": THRESHOLD_RULE,
        "target_sensitivity": TARGET_SENSITIVITY,
        "auc": round(auc(test_lvo, test.y.numpy()), 4),
        "sensitivity": round(test_point["sensitivity"], 4),
        "specificity": round(test_point["specificity"], 4),
        "accuracy": round(test_point["accuracy"], 4),
        **side_metrics(test_lvo, test_left, test, threshold),
        "by_site": by_site(test_lvo, test, threshold),
        "val_auc": round(auc(val_lvo, val.y.numpy()), 4),
        "val_operating_point": {
            k: round(v, 4) for k, v in operating_point(val_lvo, val.y.numpy(), threshold).items()
        },
        "train_size": args.train,
        "val_size": args.val,
        "test_size": args.test,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "aux_clot_map_weight": args.map_weight,
        "side_weight": args.side_weight,
        "seed": args.seed,
        "history": history,
        "data_generation_seconds": round(data_seconds, 1),
        "training_seconds": round(training_seconds, 1),
        "threads": args.threads,
        "input_shape": list(LVO_INPUT_SHAPE),
        "outputs": ["probability (P(LVO))", "side_left_probability (P(left | LVO))"],
        "channels": list(MODEL_CHANNELS),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_file": path.name,
        "weights_bytes": path.stat().st_size,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "note": (
            f"Trained and evaluated on synthetic phantoms (models/{MODEL_NAME}/phantoms.py). "
            "Not for clinical use."
        ),
    }
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    console.print(
        f"lvo_detector on {args.test} test phantoms: AUC {metrics['auc']}, threshold {metrics['threshold']}, "
        f"sensitivity {metrics['sensitivity']}, specificity {metrics['specificity']}, "
        f"side accuracy {metrics['side_accuracy']} ({training_seconds:.0f} s)"
    )
    console.print(f"wrote {path}, {', '.join(map(str, configs))} and {args.metrics}")


TRITON_CONFIG = """\
# GENERATED by models/lvo_detector/train.py (it also writes the weights in 1/); edit the template there.
# Reference large-vessel-occlusion detector, trained on synthetic phantoms: NOT for clinical use.
# Served by the Python backend (1/model.py + TorchScript 1/{weights}).{variant_note}
name: "{name}"
backend: "python"
max_batch_size: {max_batch}

input [
  {{
    name: "volume"
    data_type: TYPE_FP32
    # Channels (vessel window on a bone-stripped volume, bone window), slabs, rows, columns:
    # processors.preprocessing.LVO_INPUT_SHAPE. Triton rejects any other shape.
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "probability"
    data_type: TYPE_FP32
    # P(large-vessel occlusion), sigmoid applied in the model. Same name as every radtriage
    # model's main output, so a client that reads only "probability" works unchanged.
    dims: [ 1 ]
  }},
  {{
    name: "side_left_probability"
    data_type: TYPE_FP32
    # P(the occlusion is on the patient's left | there is one); 1 - this is P(right).
    # Meaningless for a study below the threshold.
    dims: [ 1 ]
  }}
]

dynamic_batching {{
  # Wait at most 2 ms to fill a batch: a stat study must not sit behind batching.
  max_queue_delay_microseconds: 2000
  # 1 = stat, 2 = urgent, 3 = routine (radtriage lanes); requests without a priority are routine.
  priority_levels: 3
  default_priority_level: 3
  default_queue_policy {{
    # Requests may carry their own (shorter) queue timeout; none waits more than 30 s.
    timeout_action: REJECT
    default_timeout_microseconds: 30000000
    allow_timeout_override: true
  }}
}}

instance_group [
  {{
    count: {count}
    kind: {kind}
  }}
]

parameters: {{
  key: "input_shape"
  value: {{ string_value: "{dims}" }}
}}
parameters: {{
  key: "display_name"
  value: {{ string_value: "{display}" }}
}}
parameters: {{
  key: "model_version"
  value: {{ string_value: "{version}" }}
}}
parameters: {{
  key: "finding"
  value: {{ string_value: "LVO" }}
}}
parameters: {{
  key: "recommended_threshold"
  value: {{ string_value: "{threshold}" }}
}}
parameters: {{
  key: "threshold_rule"
  value: {{ string_value: "{rule}" }}
}}
"""


if __name__ == "__main__":
    main()
