"""The one training engine of every model (docs/ARCHITECTURE.md, Models).

A model's recipe, `models/<name>/train.py`, says only what is its own: its phantoms, its
batches and loss, its extra metrics (its Triton interface is in its spec, `SPEC.serving`,
from which models/serving.py writes the configs). What every recipe does the same way is here:

* `arguments`: the command line (`--out`, `--metrics`, `--seed`, the set sizes, epochs,
  batch, learning rate, threads, phantom workers, `--configs-only`), defaults from the spec
  and the recipe's `Defaults`;
* `Run`: seeds, threads, the progress display and the clock, and the three phantom sets,
  seeded apart (`models/operating_point.py`: train, validation, test);
* `phantoms`: phantom generation in a pool of processes, one core each;
* `fit` (`fit_indexed` over shuffled batches of the training set): AdamW with a one-cycle
  schedule over the recipe's batches and loss, and a line of history per epoch
  (`auc_epoch`: the validation AUC);
* `vary_exposure`: the radiograph recipes' intensity augmentation;
* `export`: TorchScript + the generated `model.py`, checked against the spec's interface,
  both Triton configs from the spec, the ONNX variant;
* `record`: the threshold chosen on validation (`models/operating_point.py`), the test
  set's operating point, and the metrics file every recipe writes, with the same keys;
* `finish`: `export` then `record`, what every recipe ends with; `report`: its summary line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import monai
import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
from models.serving import check_served, committed_operating_point, export_torchscript, write_triton_configs
from models.spec import ModelSpec

console = Console()
REPO = Path(__file__).resolve().parent.parent
MIN_TEST = 200
T = TypeVar("T")
U = TypeVar("U")
B = TypeVar("B")


def out_dir(spec: ModelSpec) -> Path:
    """The Triton version directory a recipe exports to by default."""
    return REPO / "deploy" / "triton" / "model_repository" / spec.name / spec.version


def metrics_path(spec: ModelSpec) -> Path:
    return REPO / "models" / spec.name / "metrics.json"


@dataclass(frozen=True)
class Defaults:
    """A recipe's default set sizes (training items; validation and test studies), epochs,
    batch and peak learning rate: what its committed weights were trained with."""

    train: int
    val: int
    test: int
    epochs: int
    batch: int
    lr: float


def arguments(
    doc: str | None,
    spec: ModelSpec,
    defaults: Defaults,
    *,
    train_help: str = "training phantoms",
    eval_unit: str = "phantoms",
    batch_help: str | None = None,
    workers: bool = True,
) -> argparse.ArgumentParser:
    """The options every recipe has, with its defaults; a recipe adds its own after."""
    d = defaults
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=out_dir(spec), help="Triton model version directory")
    ap.add_argument("--metrics", type=Path, default=metrics_path(spec))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=d.train, help=train_help)
    ap.add_argument("--val", type=int, default=d.val, help=f"validation {eval_unit} (threshold choice)")
    ap.add_argument("--test", type=int, default=d.test, help=f"held-out test {eval_unit} (reported metrics)")
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch", type=int, default=d.batch, help=batch_help)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--threads", type=int, default=2)
    if workers:
        ap.add_argument("--workers", type=int, default=2, help="processes generating phantoms")
    ap.add_argument(
        "--configs-only",
        action="store_true",
        help="no training: rewrite config.pbtxt and configs/gpu.pbtxt of the committed model "
        "(threshold and version from --metrics)",
    )
    return ap


def configs_only(
    ap: argparse.ArgumentParser, args: argparse.Namespace, spec: ModelSpec, eval_unit: str = "phantoms"
) -> bool:
    """Handle `--configs-only` (True: done, nothing to train); refuse a test set too small
    for its metrics to mean much."""
    if args.configs_only:
        for path in committed_configs(spec, args.out, args.metrics):
            console.print(f"wrote {path}")
        return True
    if args.test < MIN_TEST:
        ap.error(f"--test must be at least {MIN_TEST} {eval_unit} for the reported metrics to mean much")
    return False


def phantoms(
    make: Callable[[tuple[int, int]], T],
    n: int,
    seed: int,
    workers: int,
    progress: Progress,
    label: str,
    chunksize: int = 4,
) -> Iterator[T]:
    """`make((seed, index))` for each of the `n` items of the set seeded `seed`, in order, in
    `workers` processes (spawned: each phantom is numpy work on one core, and a process per
    core halves the wait); one progress tick per item. `make` draws item `index` from its own
    generator of (seed, index), so the set is the same however the work is split."""
    jobs = [(seed, i) for i in range(n)]
    task = progress.add_task(f"phantoms: {label}", total=len(jobs))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(make, jobs, chunksize=chunksize) if pool is not None else map(make, jobs)
        for result in results:
            yield result
            progress.advance(task)


@dataclass
class Run:
    """One training run: its options, the progress display and the clock."""

    args: argparse.Namespace
    progress: Progress
    started: float = field(default_factory=time.time)
    data_seconds: float = 0.0
    fit_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    # What `finish` wrote: the weights and the Triton configs.
    weights: Path | None = None
    configs: list[Path] = field(default_factory=list)

    def sets(self, make: Callable[[int, int, str], T]) -> tuple[T, T, T]:
        """The train, validation and test sets, `make(n, seed, label)` each, seeded apart so no
        phantom is in two of them."""
        return self.split(lambda n, seed: make(n, seed, "train"), make)

    def phantom_sets(self, make: Callable[[int, int, Progress, str, int], T]) -> tuple[T, T, T]:
        """`sets` of a recipe whose `make(n, seed, progress, label, workers)` draws a set's
        phantoms in `--workers` processes (`phantoms`), ticking the run's progress display."""
        return self.sets(lambda n, seed, label: make(n, seed, self.progress, label, self.args.workers))

    def split(
        self, make_train: Callable[[int, int], U], make: Callable[[int, int, str], T]
    ) -> tuple[U, T, T]:
        """`sets` for a recipe that trains on something else than it evaluates on (views of
        a study, say): `make_train(n, seed)`, then `make(n, seed, label)` for validation and test."""
        a, seed = self.args, self.args.seed
        train = make_train(a.train, seed)
        val = make(a.val, seed + VAL_SEED_OFFSET, "validation")
        test = make(a.test, seed + TEST_SEED_OFFSET, "test")
        self.data_seconds = time.time() - self.started
        return train, val, test


@contextlib.contextmanager
def run(args: argparse.Namespace) -> Iterator[Run]:
    """Seed torch, set its threads, and show progress while the run's data and fit are made."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        yield Run(args, progress)


def fit(
    r: Run,
    model: torch.nn.Module,
    *,
    steps_per_epoch: int,
    batches: Callable[[], Iterable[B]],
    loss: Callable[[B], tuple[torch.Tensor, int]],
    after_epoch: Callable[[int, float], dict[str, float]],
    items_per_epoch: int,
    pct_start: float = 0.15,
) -> None:
    """Train `model` for the run's epochs: AdamW (weight decay 1e-4) with a one-cycle rate (a
    short warm-up keeps the first batch-norm steps from blowing up, then a cosine decay to a
    small rate lets the last epochs settle instead of picking an epoch). Each epoch runs
    `loss` on each of `batches()` (the loss and how many items it weighs), then
    `after_epoch(epoch, mean loss)`, whose row goes into the run's history."""
    args = r.args
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=pct_start
    )
    fit_started = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        total, count = 0.0, 0
        task = r.progress.add_task(f"  epoch {epoch}", total=items_per_epoch)
        for batch in batches():
            opt.zero_grad(set_to_none=True)
            value, n = loss(batch)
            value.backward()
            opt.step()
            sched.step()
            total += float(value.detach()) * n
            count += n
            r.progress.advance(task, n)
        r.progress.remove_task(task)
        r.history.append(after_epoch(epoch, total / max(count, 1)))
    r.fit_seconds = time.time() - fit_started


def fit_indexed(
    r: Run,
    model: torch.nn.Module,
    generator: torch.Generator,
    loss: Callable[[torch.Tensor], tuple[torch.Tensor, int]],
    after_epoch: Callable[[int, float], dict[str, float]],
) -> None:
    """`fit` over the whole training set each epoch, in `--batch` batches of indices
    shuffled by `generator`."""
    args = r.args
    fit(
        r,
        model,
        steps_per_epoch=-(-args.train // args.batch),
        batches=lambda: index_batches(args.train, args.batch, generator),
        loss=loss,
        after_epoch=after_epoch,
        items_per_epoch=args.train,
    )


def auc_epoch(
    scores: Callable[[], np.ndarray], labels: np.ndarray, what: str = "validation AUC"
) -> Callable[[int, float], dict[str, float]]:
    """An `after_epoch` whose history row is the epoch's training loss and the AUC of
    `scores()` (the validation set's, now) against `labels`."""

    def after_epoch(epoch: int, train_loss: float) -> dict[str, float]:
        val_auc = auc(scores(), labels)
        console.log(f"epoch {epoch}: train loss {train_loss:.4f}, {what} {val_auc:.4f}")
        return {"epoch": epoch, "train_loss": round(train_loss, 5), "val_auc": round(val_auc, 5)}

    return after_epoch


def vary_exposure(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A radiograph batch (n, c, rows, cols) in [0, 1] with a random gamma and contrast per
    image: exposure and vendor processing vary."""
    n = len(x)
    gamma = torch.exp(0.25 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 2)
    contrast = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    return torch.clamp(x.clamp(min=1e-6) ** gamma * contrast, 0.0, 1.0)


def index_batches(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch's batches of indices into a set of `n`, in an order drawn from `generator`."""
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch):
        yield order[i : i + batch]


def outputs(module: torch.nn.Module, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, ...]:
    """Each output of `module` for a whole set, in eval mode (batch-norm running statistics,
    no dropout), `batch` items at a time (a float16 set is made float32 a batch at a time)."""
    module.eval()
    parts = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = module(x[i : i + batch].float())
            parts.append(out if isinstance(out, tuple) else (out,))
    return tuple(torch.cat(each) for each in zip(*parts, strict=True))


def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> np.ndarray:
    """P(finding) of a one-output network for a whole set."""
    (logits,) = outputs(model, x, batch)
    return torch.sigmoid(logits).reshape(-1).numpy()


def committed_configs(spec: ModelSpec, out: Path, metrics: Path) -> list[Path]:
    """The Triton configs of the committed weights, without training (`--configs-only`):
    threshold, rule and version from the metrics file the run that made them wrote."""
    chosen, version, rule = committed_operating_point(metrics, out.parent.name)
    return write_triton_configs(out.parent, spec, threshold=chosen, version=version, rule=rule)


def sensitivity_by(
    scores: np.ndarray, labels: np.ndarray, groups: Iterable[tuple[str, np.ndarray]], chosen: float
) -> dict[str, dict[str, float]]:
    """Per group of positive studies (a name and its mask; empty groups left out): how many,
    the sensitivity at the threshold, and the AUC of the group against all the negatives."""
    out: dict[str, dict[str, float]] = {}
    for name, mask in groups:
        if mask.any():
            versus = mask | (labels == 0)
            out[name] = {
                "n": int(mask.sum()),
                "sensitivity": round(float((scores[mask] >= chosen).mean()), 4),
                "auc_vs_normals": round(auc(scores[versus], labels[versus]), 4),
            }
    return out


def threshold(val_scores: np.ndarray, val_labels: np.ndarray) -> float:
    """The operating threshold, chosen on validation only (THRESHOLD_RULE)."""
    return choose_threshold(val_scores, val_labels, TARGET_SENSITIVITY)


def export(
    r: Run, spec: ModelSpec, served: torch.nn.Module, input_shape: Sequence[int], chosen: float
) -> tuple[Path, list[Path]]:
    """The served module as TorchScript in the version directory (with its generated
    model.py), checked against the spec's Triton interface; both Triton configs with the
    chosen threshold, and the ONNX variant."""
    out = r.args.out
    with torch.no_grad():
        outputs = served.eval()(torch.zeros((1, *input_shape)))
    check_served(spec, input_shape, outputs if isinstance(outputs, tuple) else (outputs,))
    path = export_torchscript(served, input_shape, out)
    configs = write_triton_configs(out.parent, spec, threshold=chosen, version=out.name, rule=THRESHOLD_RULE)
    configs += export_onnx(out.parent, version=out.name)[:2]
    return path, configs


def record(
    r: Run,
    spec: ModelSpec,
    *,
    chosen: float,
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    model: torch.nn.Module,
    weights: Path,
    input_shape: Sequence[int],
    results: dict[str, Any],
    settings: dict[str, Any],
    described: dict[str, Any],
    phantoms_file: str = "",
) -> dict[str, Any]:
    """The metrics file every recipe writes (`--metrics`): the operating point on the test set
    at the validation-chosen threshold, the recipe's `results` (breakdowns), validation, the
    run's sizes and `settings`, its history and times, what is served (`described`: outputs,
    channels or architecture) and the versions it was made with."""
    args = r.args
    (val_scores, val_labels), (test_scores, test_labels) = val, test
    point = operating_point(test_scores, test_labels, chosen)
    training_seconds = time.time() - r.started
    drawn_by = phantoms_file or f"models/{spec.name}/phantoms.py"
    metrics: dict[str, Any] = {
        "model": args.out.parent.name,
        "version": args.out.name,
        "finding": spec.finding,
        "threshold": round(chosen, 4),
        "threshold_rule": THRESHOLD_RULE,
        "target_sensitivity": TARGET_SENSITIVITY,
        # Held-out test set, at the validation-chosen threshold.
        "auc": round(auc(test_scores, test_labels), 4),
        "sensitivity": round(point["sensitivity"], 4),
        "specificity": round(point["specificity"], 4),
        "accuracy": round(point["accuracy"], 4),
        **results,
        "val_auc": round(auc(val_scores, val_labels), 4),
        "val_operating_point": {
            k: round(v, 4) for k, v in operating_point(val_scores, val_labels, chosen).items()
        },
        "train_size": args.train,
        "val_size": args.val,
        "test_size": args.test,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        **settings,
        "seed": args.seed,
        "history": r.history,
        "data_generation_seconds": round(r.data_seconds, 1),
        "fit_seconds": round(r.fit_seconds, 1),
        "training_seconds": round(training_seconds, 1),
        "threads": args.threads,
        "input_shape": list(input_shape),
        **described,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_file": weights.name,
        "weights_bytes": weights.stat().st_size,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "note": (f"Trained and evaluated on synthetic phantoms ({drawn_by}). Not for clinical use."),
    }
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def finish(
    r: Run,
    spec: ModelSpec,
    served: torch.nn.Module,
    input_shape: Sequence[int],
    *,
    chosen: float,
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    model: torch.nn.Module,
    results: dict[str, Any],
    settings: dict[str, Any],
    described: dict[str, Any],
    phantoms_file: str = "",
) -> dict[str, Any]:
    """What every recipe ends with: `export` of what is served, then `record` of its metrics
    (returned); the run keeps the paths written for `report`."""
    r.weights, r.configs = export(r, spec, served, input_shape, chosen)
    return record(
        r,
        spec,
        chosen=chosen,
        val=val,
        test=test,
        model=model,
        weights=r.weights,
        input_shape=input_shape,
        results=results,
        settings=settings,
        described=described,
        phantoms_file=phantoms_file,
    )


def report(r: Run, metrics: dict[str, Any], unit: str, extra: str = "") -> None:
    """The run's summary line and what it wrote."""
    console.print(
        f"{metrics['model']} on {metrics['test_size']} test {unit}: AUC {metrics['auc']}, "
        f"threshold {metrics['threshold']}, sensitivity {metrics['sensitivity']}, "
        f"specificity {metrics['specificity']}{extra} ({metrics['training_seconds']:.0f} s)"
    )
    console.print(f"wrote {r.weights}, {', '.join(map(str, r.configs))} and {r.args.metrics}")
