"""Train the reference ICH classifier on synthetic head-CT phantoms and export it for Triton.

    python -m models.ich_classifier.train --out deploy/triton/model_repository/ich_classifier/1 --seed 0

Phantoms (half with blood) are generated from the seed and go through
`processors.preprocessing.preprocess_head_ct` — the same code the inference path
runs — so what the network learns is what it is served. Three disjoint phantom sets:

* train: what the weights are fitted on (left-right flips as augmentation);
* validation: picks the operating threshold (highest with sensitivity >= target);
* test (>= 200 studies): the reported metrics, at that threshold, never used to
  choose anything — so they are an honest estimate on unseen phantoms.

Writes `model.pt` (TorchScript of network + sigmoids: probability and blood map out) into the Triton
model version directory, the model's `config.pbtxt` (KIND_CPU, the local stack) and
`configs/gpu.pbtxt` (KIND_GPU, production; both with the input shape and recommended
threshold, from one template via models/serving.py) and
`models/ich_classifier/metrics.json`. About 7 minutes on 2 CPU cores with the defaults.

    python -m models.ich_classifier.train --configs-only

rewrites only the two config files of the committed model (threshold and version from
its metrics file), without training: what to run after editing TRITON_CONFIG;
`--reexport` also re-traces the committed weights with the current served outputs
(IchWithSigmoid: probability and the blood map as `localisation_map`), checking the
probabilities are unchanged.

Training signal: the study label (bleed or not) and, as an auxiliary dense target, the
phantom's blood mask at the network's stage-1 resolution (see models/ich_classifier/net.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from models import serving
from models.ich_classifier.net import MODEL_CHANNELS, IchNet, IchWithSigmoid, build_ich_net
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
from models.phantoms import head_ct_phantom
from processors.preprocessing import ICH_INPUT_SHAPE, preprocess_head_ct, preprocess_head_ct_with_mask

console = Console()
REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "deploy" / "triton" / "model_repository" / "ich_classifier" / "1"
DEFAULT_METRICS = REPO / "models" / "ich_classifier" / "metrics.json"
MODEL_FILE = serving.MODEL_FILE
# The auxiliary blood map is at stage-1 resolution of the network: input / (2, 4, 4).
MAP_POOL = (2, 4, 4)
MAP_SHAPE = tuple(n // p for n, p in zip(ICH_INPUT_SHAPE[1:], MAP_POOL, strict=True))
# Blood fills a few per mille of the map: up-weight it so the map does not learn "never".
MAP_POS_WEIGHT = 10.0
SERVED_OUTPUTS = ("probability (P(ICH))", "localisation_map (P(blood) per map cell, 16 x 24 x 24)")
SIZE_BINS = (("<1 mL", 0.0, 1.0), ("1-5 mL", 1.0, 5.0), (">=5 mL", 5.0, float("inf")))


@dataclass
class PhantomSet:
    x: torch.Tensor  # (n, *ICH_INPUT_SHAPE) float16: half the memory, ample precision for [0, 1] input
    y: torch.Tensor  # (n,) float32, 1 = bleed
    blood: torch.Tensor  # (n, 1, *MAP_SHAPE) float16: share of each map cell that is visible blood
    volume_ml: np.ndarray  # (n,) blood volume, 0 for normals
    kind: list[str]  # "none", "intraparenchymal", "subdural" or "both"


def make_set(n: int, seed: int, progress: Progress, label: str) -> PhantomSet:
    rng = np.random.default_rng(seed)
    xs = torch.empty((n, *ICH_INPUT_SHAPE), dtype=torch.float16)
    ys = torch.empty(n, dtype=torch.float32)
    maps = torch.zeros((n, 1, *MAP_SHAPE), dtype=torch.float16)
    volumes = np.zeros(n)
    kinds: list[str] = []
    task = progress.add_task(f"phantoms: {label}", total=n)
    for i in range(n):
        ph = head_ct_phantom(rng, bleed=bool(i % 2))
        if ph.blood_mask is None:
            xs[i] = torch.from_numpy(preprocess_head_ct(ph.hu, ph.spacing_zyx))
        else:
            x, mask = preprocess_head_ct_with_mask(ph.hu, ph.spacing_zyx, ph.blood_mask)
            xs[i] = torch.from_numpy(x)
            maps[i, 0] = torch.nn.functional.avg_pool3d(torch.from_numpy(mask)[None], MAP_POOL)[0]
        ys[i] = float(ph.has_bleed)
        volumes[i] = ph.bleed_volume_ml
        names = {b.kind for b in ph.bleeds}
        kinds.append("none" if not names else "both" if len(names) > 1 else names.pop())
        progress.advance(task)
    return PhantomSet(xs, ys, maps, volumes, kinds)


def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> np.ndarray:
    """Probabilities for a whole set, in eval mode (batch-norm running statistics, no dropout)."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(torch.sigmoid(model(x[i : i + batch].float())).reshape(-1))
    return torch.cat(out).numpy()


def breakdown(
    scores: np.ndarray, labels: np.ndarray, data: PhantomSet, threshold: float
) -> dict[str, dict[str, dict[str, float]]]:
    """Sensitivity (and AUC against all normals) per bleed size and per bleed kind."""
    pred = scores >= threshold
    neg = labels == 0
    out: dict[str, dict[str, dict[str, float]]] = {"by_bleed_volume": {}, "by_bleed_kind": {}}
    groups: list[tuple[str, str, np.ndarray]] = [
        ("by_bleed_volume", name, (labels == 1) & (data.volume_ml >= lo) & (data.volume_ml < hi))
        for name, lo, hi in SIZE_BINS
    ]
    kinds = np.array(data.kind)
    groups += [("by_bleed_kind", k, kinds == k) for k in ("intraparenchymal", "subdural", "both")]
    for section, name, mask in groups:
        if mask.any():
            sub = mask | neg
            out[section][name] = {
                "n": int(mask.sum()),
                "sensitivity": round(float(pred[mask].mean()), 4),
                "auc_vs_normals": round(auc(scores[sub], labels[sub]), 4),
            }
    return out


TRITON_CONFIG = """\
# GENERATED by models/ich_classifier/train.py (it also writes the weights in 1/); edit the template there.
# Reference intracranial-haemorrhage classifier, trained on synthetic phantoms: NOT for clinical use.
# Served by the Python backend (1/model.py + TorchScript 1/{weights}).{variant_note}
name: "{name}"
backend: "python"
max_batch_size: {max_batch}

input [
  {{
    name: "volume"
    data_type: TYPE_FP32
    # Channels (brain, narrow blood and bone windows), slices, rows, columns:
    # processors.preprocessing.ICH_INPUT_SHAPE. Triton rejects any other shape.
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "probability"
    data_type: TYPE_FP32
    # Sigmoid applied in the model: probability of intracranial haemorrhage.
    dims: [ 1 ]
  }},
  {{
    name: "localisation_map"
    data_type: TYPE_FP32
    # The network's blood map, sigmoid applied: P(blood) per cell of 2 model slices x 4 x 4
    # voxels of the input (processors/localisation.py maps it back to the series' slices
    # for the finding's slice range). Clients that read only "probability" ignore it.
    dims: [ {map_dims} ]
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
  # What the weights were trained on; model.py validates requests against it even if the
  # dims above are ever relaxed.
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
  value: {{ string_value: "ICH" }}
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
DISPLAY_NAME = "radtriage reference ICH classifier (synthetic phantoms, not for clinical use)"


def write_triton_configs(
    model_dir: Path, threshold: float, version: str, rule: str = THRESHOLD_RULE
) -> list[Path]:
    """config.pbtxt (KIND_CPU) and configs/gpu.pbtxt (KIND_GPU), from TRITON_CONFIG and the
    chosen threshold (models/serving.py: one template, both parsed as ModelConfig)."""
    return serving.write_triton_configs(
        model_dir,
        template=TRITON_CONFIG.replace("{map_dims}", ", ".join(map(str, MAP_SHAPE))),
        input_shape=ICH_INPUT_SHAPE,
        threshold=threshold,
        version=version,
        rule=rule,
        display=DISPLAY_NAME,
    )


def export(model: IchNet, out_dir: Path) -> Path:
    """TorchScript of what is served (IchWithSigmoid), traced in eval mode; self-contained for Triton."""
    return serving.export_torchscript(IchWithSigmoid(model), ICH_INPUT_SHAPE, out_dir)


def reexport_committed(out: Path = DEFAULT_OUT, metrics_path: Path = DEFAULT_METRICS) -> Path:
    """Re-trace the committed weights with the current served wrapper (IchWithSigmoid), no
    training: the TorchScript file's parameters are loaded into a fresh IchNet, exported
    again, and the new file must give the old one's probabilities. Updates weights_bytes in
    the metrics (the file's size is what changes)."""
    path = out / MODEL_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch 2.15
        old = torch.jit.load(str(path), map_location="cpu").eval()
    wrapper = IchWithSigmoid(build_ich_net())
    wrapper.load_state_dict(old.state_dict())  # strict: every parameter, nothing else
    probe = torch.rand((2, *ICH_INPUT_SHAPE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = old(probe)
        before = before[0] if isinstance(before, tuple) else before
    export(wrapper.net, out)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        after = torch.jit.load(str(path), map_location="cpu").eval()(probe)[0]
    if not torch.allclose(before, after, atol=1e-6):
        raise RuntimeError("re-exported weights give other probabilities than the committed ones")
    metrics = json.loads(metrics_path.read_text())
    metrics["weights_bytes"] = path.stat().st_size
    metrics["outputs"] = list(SERVED_OUTPUTS)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    export_onnx(out.parent, version=out.name)  # the ONNX variant follows the re-traced weights
    return path


def write_configs_only(out: Path = DEFAULT_OUT, metrics_path: Path = DEFAULT_METRICS) -> list[Path]:
    """The Triton configs of the committed model, without training: threshold, rule and
    version from its metrics file (what the training run that made the weights chose)."""
    threshold, version, rule = serving.committed_operating_point(metrics_path, out.parent.name)
    return write_triton_configs(out.parent, threshold, version=version, rule=rule)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Triton model version directory")
    ap.add_argument("--metrics", type=Path, default=DEFAULT_METRICS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=1000, help="training phantoms (half with blood)")
    ap.add_argument("--val", type=int, default=300, help="validation phantoms (threshold choice)")
    ap.add_argument("--test", type=int, default=400, help="held-out test phantoms (reported metrics)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--map-weight", type=float, default=1.0, help="weight of the auxiliary blood-map loss (0 = off)"
    )
    ap.add_argument(
        "--reexport",
        action="store_true",
        help="no training: re-trace the committed weights with the current served outputs, "
        "then rewrite the configs",
    )
    ap.add_argument(
        "--configs-only",
        action="store_true",
        help="no training: rewrite config.pbtxt and configs/gpu.pbtxt of the committed model "
        "(threshold and version from --metrics)",
    )
    args = ap.parse_args(argv)
    if args.reexport:
        console.print(f"wrote {reexport_committed(args.out, args.metrics)}")
    if args.configs_only or args.reexport:
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
        train = make_set(args.train, args.seed, progress, "train")
        val = make_set(args.val, args.seed + VAL_SEED_OFFSET, progress, "validation")
        test = make_set(args.test, args.seed + TEST_SEED_OFFSET, progress, "test")
        data_seconds = time.time() - started

        model = build_ich_net()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
        steps_per_epoch = (args.train + args.batch - 1) // args.batch
        # One-cycle: a short warm-up keeps the first batch-norm steps from blowing up, then a
        # cosine decay to a small rate lets the last epochs settle instead of picking an epoch.
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
        )
        loss_fn = torch.nn.BCEWithLogitsLoss()
        map_loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(MAP_POS_WEIGHT))
        gen = torch.Generator().manual_seed(args.seed)
        epoch_task = progress.add_task("training", total=args.epochs)
        history: list[dict[str, float]] = []
        for epoch in range(args.epochs):
            model.train()
            order = torch.randperm(args.train, generator=gen)
            total = 0.0
            batch_task = progress.add_task(f"  epoch {epoch + 1}", total=args.train)
            for i in range(0, args.train, args.batch):
                idx = order[i : i + args.batch]
                xb, mb = train.x[idx].float(), train.blood[idx].float()
                # Left-right flips: blood is as likely on either side; doubles the effective set.
                flip = torch.rand(len(idx), generator=gen) < 0.5
                xb[flip] = torch.flip(xb[flip], dims=(-1,))
                mb[flip] = torch.flip(mb[flip], dims=(-1,))
                opt.zero_grad(set_to_none=True)
                logits, map_logits = model.forward_with_map(xb)
                loss = loss_fn(logits.reshape(-1), train.y[idx]) + args.map_weight * map_loss_fn(
                    map_logits, mb
                )
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                progress.advance(batch_task, len(idx))
            progress.remove_task(batch_task)
            val_auc = auc(predict(model, val.x), val.y.numpy())
            train_loss = total / args.train
            history.append(
                {"epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_auc": round(val_auc, 5)}
            )
            console.log(f"epoch {epoch + 1}: train loss {train_loss:.4f}, validation AUC {val_auc:.4f}")
            progress.update(
                epoch_task, advance=1, description=f"training (loss {train_loss:.3f}, val AUC {val_auc:.3f})"
            )

    # The final weights are the model: no epoch is picked on validation, so validation picks
    # only the threshold and the test set stays untouched until here.
    val_scores, val_labels = predict(model, val.x), val.y.numpy()
    threshold = choose_threshold(val_scores, val_labels, TARGET_SENSITIVITY)
    test_scores, test_labels = predict(model, test.x), test.y.numpy()
    test_point = operating_point(test_scores, test_labels, threshold)
    path = export(model, args.out)
    rule = THRESHOLD_RULE
    configs = write_triton_configs(args.out.parent, threshold, version=args.out.name, rule=rule)
    configs += export_onnx(args.out.parent, version=args.out.name)[:2]
    training_seconds = time.time() - started

    metrics: dict[str, Any] = {
        "model": args.out.parent.name,
        "version": args.out.name,
        "finding": "ICH",
        "threshold": round(threshold, 4),
        "threshold_rule": rule,
        "target_sensitivity": TARGET_SENSITIVITY,
        # Held-out test set, at the validation-chosen threshold.
        "auc": round(auc(test_scores, test_labels), 4),
        "sensitivity": round(test_point["sensitivity"], 4),
        "specificity": round(test_point["specificity"], 4),
        "accuracy": round(test_point["accuracy"], 4),
        **breakdown(test_scores, test_labels, test, threshold),
        "val_auc": round(auc(val_scores, val_labels), 4),
        "val_operating_point": {
            k: round(v, 4) for k, v in operating_point(val_scores, val_labels, threshold).items()
        },
        "train_size": args.train,
        "val_size": args.val,
        "test_size": args.test,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "aux_blood_map_weight": args.map_weight,
        "seed": args.seed,
        "history": history,
        "data_generation_seconds": round(data_seconds, 1),
        "training_seconds": round(training_seconds, 1),
        "threads": args.threads,
        "input_shape": list(ICH_INPUT_SHAPE),
        "channels": list(MODEL_CHANNELS),
        "parameters": sum(p.numel() for p in model.parameters()),
        "outputs": list(SERVED_OUTPUTS),
        "weights_file": MODEL_FILE,
        "weights_bytes": path.stat().st_size,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "note": "Trained and evaluated on synthetic phantoms (models/phantoms.py). Not for clinical use.",
    }
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")

    table = Table(title=f"ich_classifier on {args.test} held-out test phantoms")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("auc", "threshold", "sensitivity", "specificity", "val_auc", "training_seconds"):
        table.add_row(key, f"{metrics[key]:.4g}")
    for section in ("by_bleed_volume", "by_bleed_kind"):
        for name, row in metrics[section].items():
            table.add_row(
                f"sensitivity, {name}",
                f"{row['sensitivity']:.3f} (n={row['n']}, AUC {row['auc_vs_normals']:.3f})",
            )
    console.print(table)
    size_mb = path.stat().st_size / 1e6
    console.print(f"wrote {path} ({size_mb:.1f} MB), {', '.join(map(str, configs))} and {args.metrics}")


if __name__ == "__main__":
    main()
