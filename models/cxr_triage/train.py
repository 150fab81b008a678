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
from processors.preprocessing import CXR_INPUT_SHAPE, preprocess_radiograph, preprocess_radiograph_with_mask

console = Console()
REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "cxr_triage"
DEFAULT_OUT = REPO / "deploy" / "triton" / "model_repository" / MODEL_NAME / "1"
DEFAULT_METRICS = REPO / "models" / MODEL_NAME / "metrics.json"
DISPLAY_NAME = "radtriage reference chest X-ray triage (synthetic phantoms, not for clinical use)"
MAP_SHAPE = tuple(n // MAP_STRIDE for n in CXR_INPUT_SHAPE[1:])
MAP_POS_WEIGHT = 5.0  # pleural air fills a few per cent of the map
SIZE_BINS = (("<10 % rim", 0.0, 0.10), ("10-20 % rim", 0.10, 0.20), (">=20 % rim", 0.20, 1.0))


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
    task = progress.add_task(f"phantoms: {label}", total=n)
    jobs = [(seed, i) for i in range(n)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(_phantom, jobs, chunksize=8) if pool is not None else map(_phantom, jobs)
        for i, (x, a, y, r) in enumerate(results):
            xs[i] = torch.from_numpy(x)
            air[i, 0] = torch.from_numpy(a)
            ys[i], rim[i] = y, r
            progress.advance(task)
    return CxrSet(xs, ys, air, rim)


def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(torch.sigmoid(model(x[i : i + batch].float())).reshape(-1))
    return torch.cat(out).numpy()


def by_size(scores: np.ndarray, data: CxrSet, threshold: float) -> dict[str, dict[str, float]]:
    y = data.y.numpy()
    out: dict[str, dict[str, float]] = {}
    for name, lo, hi in SIZE_BINS:
        m = (y == 1) & (data.rim >= lo) & (data.rim < hi)
        if m.any():
            sub = m | (y == 0)
            out[name] = {
                "n": int(m.sum()),
                "sensitivity": round(float((scores[m] >= threshold).mean()), 4),
                "auc_vs_normals": round(auc(scores[sub], y[sub]), 4),
            }
    return out


def write_configs(model_dir: Path, threshold: float, version: str, rule: str) -> list[Path]:
    """config.pbtxt (KIND_CPU) and configs/gpu.pbtxt (KIND_GPU) from TRITON_CONFIG."""
    return write_triton_configs(
        model_dir,
        template=TRITON_CONFIG,
        input_shape=CXR_INPUT_SHAPE,
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
    ap.add_argument("--train", type=int, default=900, help="training phantoms (half with a pneumothorax)")
    ap.add_argument("--val", type=int, default=250, help="validation phantoms (threshold choice)")
    ap.add_argument("--test", type=int, default=250, help="held-out test phantoms (reported metrics)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="processes generating phantoms")
    ap.add_argument("--map-weight", type=float, default=1.0, help="weight of the air-map loss (0 = off)")
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

        model = build_cxr_net()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
        steps_per_epoch = (args.train + args.batch - 1) // args.batch
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
        )
        loss_fn = torch.nn.BCEWithLogitsLoss()
        map_loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(MAP_POS_WEIGHT))
        gen = torch.Generator().manual_seed(args.seed)
        history: list[dict[str, float]] = []
        for epoch in range(args.epochs):
            model.train()
            order = torch.randperm(args.train, generator=gen)
            total = 0.0
            task = progress.add_task(f"  epoch {epoch + 1}", total=args.train)
            for i in range(0, args.train, args.batch):
                idx = order[i : i + args.batch]
                xb = train.x[idx].float()
                # Exposure and processing vary: a random gamma and contrast per image.
                gamma = torch.exp(0.25 * (torch.rand(len(idx), 1, 1, 1, generator=gen) - 0.5) * 2)
                contrast = 1 + 0.2 * (torch.rand(len(idx), 1, 1, 1, generator=gen) - 0.5)
                xb = torch.clamp(xb.clamp(min=1e-6) ** gamma * contrast, 0.0, 1.0)
                opt.zero_grad(set_to_none=True)
                logits, air = model.forward_with_map(xb)
                loss = loss_fn(logits.reshape(-1), train.y[idx]) + args.map_weight * map_loss_fn(
                    air, train.air[idx].float()
                )
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                progress.advance(task, len(idx))
            progress.remove_task(task)
            val_auc = auc(predict(model, val.x), val.y.numpy())
            train_loss = total / args.train
            history.append(
                {"epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_auc": round(val_auc, 5)}
            )
            console.log(f"epoch {epoch + 1}: train loss {train_loss:.4f}, validation AUC {val_auc:.4f}")

    val_scores = predict(model, val.x)
    threshold = choose_threshold(val_scores, val.y.numpy(), TARGET_SENSITIVITY)
    test_scores = predict(model, test.x)
    test_point = operating_point(test_scores, test.y.numpy(), threshold)
    path = export_torchscript(CxrWithSigmoid(model), CXR_INPUT_SHAPE, args.out)
    configs = write_configs(args.out.parent, threshold, version=args.out.name, rule=THRESHOLD_RULE)
    configs += export_onnx(args.out.parent, version=args.out.name)[:2]
    training_seconds = time.time() - started
    metrics: dict[str, Any] = {
        "model": args.out.parent.name,
        "version": args.out.name,
        "finding": "CXR_CRITICAL",  # schemas.requests.FindingCode; the critical finding here is pneumothorax
        "threshold": round(threshold, 4),
        "threshold_rule": THRESHOLD_RULE,
        "target_sensitivity": TARGET_SENSITIVITY,
        "auc": round(auc(test_scores, test.y.numpy()), 4),
        "sensitivity": round(test_point["sensitivity"], 4),
        "specificity": round(test_point["specificity"], 4),
        "accuracy": round(test_point["accuracy"], 4),
        "by_rim_size": by_size(test_scores, test, threshold),
        "val_auc": round(auc(val_scores, val.y.numpy()), 4),
        "val_operating_point": {
            k: round(v, 4) for k, v in operating_point(val_scores, val.y.numpy(), threshold).items()
        },
        "train_size": args.train,
        "val_size": args.val,
        "test_size": args.test,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "history": history,
        "data_generation_seconds": round(data_seconds, 1),
        "training_seconds": round(training_seconds, 1),
        "threads": args.threads,
        "input_shape": list(CXR_INPUT_SHAPE),
        "outputs": ["probability (P(pneumothorax))"],
        "architecture": (
            f"monai DenseNet 2D, init_features {INIT_FEATURES}, growth_rate {GROWTH_RATE}, "
            f"bn_size {BN_SIZE}, block_config {list(BLOCK_CONFIG)}; pooled head with an air map"
        ),
        "aux_air_map_weight": args.map_weight,
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
        f"cxr_triage on {args.test} test phantoms: AUC {metrics['auc']}, threshold {metrics['threshold']}, "
        f"sensitivity {metrics['sensitivity']}, specificity {metrics['specificity']} "
        f"({training_seconds:.0f} s)"
    )
    console.print(f"wrote {path}, {', '.join(map(str, configs))} and {args.metrics}")


TRITON_CONFIG = """\
# GENERATED by models/cxr_triage/train.py (it also writes the weights in 1/); edit the template there.
# Reference chest X-ray (CR/DX) triage model, trained on synthetic phantoms: NOT for clinical use.
# Served by the Python backend (1/model.py + TorchScript 1/{weights}).{variant_note}
name: "{name}"
backend: "python"
max_batch_size: {max_batch}

input [
  {{
    name: "volume"
    data_type: TYPE_FP32
    # One radiograph: channel, rows, columns (processors.preprocessing.CXR_INPUT_SHAPE).
    # Named "volume" like every radtriage model's input, so the client needs no per-model name.
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "probability"
    data_type: TYPE_FP32
    # P(critical finding: pneumothorax), sigmoid applied in the model.
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
  value: {{ string_value: "CXR_CRITICAL" }}
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
