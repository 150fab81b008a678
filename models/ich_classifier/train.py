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
threshold, from SPEC.serving via models/serving.py) and
`models/ich_classifier/metrics.json`. About 7 minutes on 2 CPU cores with the defaults.

    python -m models.ich_classifier.train --configs-only

rewrites only the two config files of the committed model (threshold and version from
its metrics file), without training: what to run after editing SPEC.serving (spec.py);
`--reexport` also re-traces the committed weights with the current served outputs
(IchWithSigmoid: probability and the blood map as `localisation_map`), checking the
probabilities are unchanged.

Training signal: the study label (bleed or not) and, as an auxiliary dense target, the
phantom's blood mask at the network's stage-1 resolution (see models/ich_classifier/net.py).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from rich.table import Table

from models import serving, training
from models.ich_classifier.net import MODEL_CHANNELS, IchNet, IchWithSigmoid, build_ich_net
from models.ich_classifier.spec import SPEC
from models.onnx_export import export_onnx
from models.phantoms import head_ct_phantom
from models.training import console
from processors.preprocessing import ICH_INPUT_SHAPE, preprocess_head_ct, preprocess_head_ct_with_mask

DEFAULT_OUT = training.out_dir(SPEC)
DEFAULT_METRICS = training.metrics_path(SPEC)
MODEL_FILE = serving.MODEL_FILE
# The auxiliary blood map is at stage-1 resolution of the network: input / (2, 4, 4).
MAP_POOL = (2, 4, 4)
MAP_SHAPE = tuple(n // p for n, p in zip(ICH_INPUT_SHAPE[1:], MAP_POOL, strict=True))
# Blood fills a few per mille of the map: up-weight it so the map does not learn "never".
MAP_POS_WEIGHT = 10.0
SERVED_OUTPUTS = ("probability (P(ICH))", "localisation_map (P(blood) per map cell, 16 x 24 x 24)")
SIZE_BINS = (("<1 mL", 0.0, 1.0), ("1-5 mL", 1.0, 5.0), (">=5 mL", 5.0, float("inf")))
DEFAULTS = training.Defaults(train=1000, val=300, test=400, epochs=8, batch=4, lr=2e-3)


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


def breakdown(
    scores: np.ndarray, labels: np.ndarray, data: PhantomSet, threshold: float
) -> dict[str, dict[str, dict[str, float]]]:
    """Sensitivity (and AUC against all normals) per bleed size and per bleed kind."""
    sizes = [
        (name, (labels == 1) & (data.volume_ml >= lo) & (data.volume_ml < hi)) for name, lo, hi in SIZE_BINS
    ]
    kinds = np.array(data.kind)
    return {
        "by_bleed_volume": training.sensitivity_by(scores, labels, sizes, threshold),
        "by_bleed_kind": training.sensitivity_by(
            scores, labels, [(k, kinds == k) for k in ("intraparenchymal", "subdural", "both")], threshold
        ),
    }


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


def main(argv: list[str] | None = None) -> None:
    ap = training.arguments(
        __doc__, SPEC, DEFAULTS, train_help="training phantoms (half with blood)", workers=False
    )
    ap.add_argument(
        "--map-weight", type=float, default=1.0, help="weight of the auxiliary blood-map loss (0 = off)"
    )
    ap.add_argument(
        "--reexport",
        action="store_true",
        help="no training: re-trace the committed weights with the current served outputs, "
        "then rewrite the configs",
    )
    args = ap.parse_args(argv)
    if args.reexport:
        console.print(f"wrote {reexport_committed(args.out, args.metrics)}")
        args.configs_only = True
    if training.configs_only(ap, args, SPEC):
        return

    with training.run(args) as r:
        train, val, test = r.sets(lambda n, seed, label: make_set(n, seed, r.progress, label))
        model = build_ich_net()
        loss_fn = torch.nn.BCEWithLogitsLoss()
        map_loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(MAP_POS_WEIGHT))
        gen = torch.Generator().manual_seed(args.seed)

        def loss(idx: torch.Tensor) -> tuple[torch.Tensor, int]:
            xb, mb = train.x[idx].float(), train.blood[idx].float()
            # Left-right flips: blood is as likely on either side; doubles the effective set.
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb[flip] = torch.flip(xb[flip], dims=(-1,))
            mb[flip] = torch.flip(mb[flip], dims=(-1,))
            logits, map_logits = model.forward_with_map(xb)
            total = loss_fn(logits.reshape(-1), train.y[idx]) + args.map_weight * map_loss_fn(map_logits, mb)
            return total, len(idx)

        validation = training.auc_epoch(lambda: training.predict(model, val.x), val.y.numpy())
        training.fit_indexed(r, model, gen, loss, validation)

    # The final weights are the model: no epoch is picked on validation, so validation picks
    # only the threshold and the test set stays untouched until here.
    val_scores, val_labels = training.predict(model, val.x), val.y.numpy()
    chosen = training.threshold(val_scores, val_labels)
    test_scores, test_labels = training.predict(model, test.x), test.y.numpy()
    metrics = training.finish(
        r,
        SPEC,
        IchWithSigmoid(model),
        ICH_INPUT_SHAPE,
        chosen=chosen,
        val=(val_scores, val_labels),
        test=(test_scores, test_labels),
        model=model,
        results=breakdown(test_scores, test_labels, test, chosen),
        settings={"aux_blood_map_weight": args.map_weight},
        described={"channels": list(MODEL_CHANNELS), "outputs": list(SERVED_OUTPUTS)},
        phantoms_file="models/phantoms.py",
    )

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
    size_mb = metrics["weights_bytes"] / 1e6
    console.print(
        f"wrote {r.weights} ({size_mb:.1f} MB), {', '.join(map(str, r.configs))} and {args.metrics}"
    )


if __name__ == "__main__":
    main()
