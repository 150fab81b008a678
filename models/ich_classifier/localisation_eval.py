"""How well the ICH classifier's slice range finds the bleed, on synthetic phantoms.

    python -m models.ich_classifier.localisation_eval  # measure, write "localisation" into the metrics
    python -m models.ich_classifier.localisation_eval --check  # measure, fail if the numbers differ

The served path, minus DICOM: each phantom goes through `preprocess_head_ct_with_crop`,
the committed TorchScript weights (the `localisation_map` output Triton serves) and
`processors.localisation.localise` with the phantom's own slice positions, so the range is
in slices of the phantom exactly as a finding states it for the series.

Two disjoint seeded sets of bleed phantoms, neither used by training:
* validation: picks the cell threshold (processors.localisation.CELL_THRESHOLD), the one
  with the best mean slice IoU between reported range and true bleed slices;
* test (held out): the reported numbers — the share of bleeds whose range overlaps a
  slice that has blood (all bleeds, and those the model calls positive at the routing
  threshold), mean IoU, and how the range's length compares with the bleed's.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.ich_classifier.train import DEFAULT_METRICS, DEFAULT_OUT, MODEL_FILE
from models.phantoms import head_ct_phantom
from processors.localisation import (
    CELL_THRESHOLD,
    LOCALISATION_OUTPUT,
    SeriesGeometry,
    affected_cells,
    cells_to_slices,
    slice_profile,
)
from processors.preprocessing import preprocess_head_ct_with_crop

VAL_SEED, TEST_SEED = 3_000_017, 4_000_037  # used by no training, validation or test set
CANDIDATES = tuple(round(t, 2) for t in np.arange(0.1, 0.91, 0.05))


@dataclass(frozen=True)
class Case:
    profile: np.ndarray  # (D',) slice profile of the localisation map
    probability: float
    geometry: SeriesGeometry
    truth: frozenset[int]  # series slices with visible blood


def make_cases(n: int, seed: int, model: torch.jit.ScriptModule) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        ph = head_ct_phantom(rng, bleed=True)
        assert ph.blood_mask is not None
        x, crop = preprocess_head_ct_with_crop(ph.hu, ph.spacing_zyx)
        with torch.no_grad():
            prob, cell_map = model(torch.from_numpy(x)[None])
        depth = ph.hu.shape[0]
        geometry = SeriesGeometry(
            crop, tuple(float(k * ph.spacing_zyx[0]) for k in range(depth)), tuple(range(1, depth + 1))
        )
        truth = frozenset(int(z) for z in np.flatnonzero(ph.blood_mask.any(axis=(1, 2))))
        cases.append(Case(slice_profile(cell_map.numpy()[0]), float(prob), geometry, truth))
    return cases


def reported(case: Case, threshold: float) -> tuple[int, int]:
    """The series slices (inclusive) the finding would state: what `localise` computes."""
    first, last = affected_cells(case.profile, threshold)
    return cells_to_slices(first, last, len(case.profile), case.geometry.crop)


def scores(cases: list[Case], threshold: float) -> dict[str, np.ndarray]:
    overlap, iou, length, true_length = [], [], [], []
    for case in cases:
        a, b = reported(case, threshold)
        got = set(range(a, b + 1))
        inter = len(got & case.truth)
        overlap.append(inter > 0)
        iou.append(inter / len(got | case.truth))
        length.append(len(got))
        true_length.append(len(case.truth))
    return {
        "overlap": np.array(overlap),
        "iou": np.array(iou),
        "length": np.array(length),
        "true_length": np.array(true_length),
    }


def choose_threshold(cases: list[Case]) -> float:
    """Best mean IoU; ties go to the lower threshold (the wider, safer range)."""
    means = [float(scores(cases, t)["iou"].mean()) for t in CANDIDATES]
    return CANDIDATES[int(np.argmax(means))]


def measure(n_val: int, n_test: int, threads: int = 2) -> dict[str, Any]:
    torch.set_num_threads(threads)
    metrics = json.loads(DEFAULT_METRICS.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch 2.15
        model = torch.jit.load(str(DEFAULT_OUT / MODEL_FILE), map_location="cpu").eval()
    val = make_cases(n_val, VAL_SEED, model)
    chosen = choose_threshold(val)
    test = make_cases(n_test, TEST_SEED, model)
    s = scores(test, chosen)
    detected = np.array([c.probability >= metrics["threshold"] for c in test])
    return {
        "output": LOCALISATION_OUTPUT,
        "cell_threshold": chosen,
        "threshold_rule": "best mean slice IoU on validation bleed phantoms",
        "val_bleeds": n_val,
        "test_bleeds": n_test,
        "test_detected": int(detected.sum()),
        "overlap_fraction": round(float(s["overlap"].mean()), 4),
        "overlap_fraction_detected": round(float(s["overlap"][detected].mean()), 4),
        "mean_iou": round(float(s["iou"].mean()), 4),
        "median_range_slices": float(np.median(s["length"])),
        "median_bleed_slices": float(np.median(s["true_length"])),
        "val_seed": VAL_SEED,
        "test_seed": TEST_SEED,
        "note": "Slice range vs the phantom's slices with blood; synthetic phantoms, not for clinical use.",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", type=int, default=100, help="validation bleed phantoms (threshold choice)")
    ap.add_argument("--test", type=int, default=200, help="held-out bleed phantoms (reported numbers)")
    ap.add_argument("--metrics", type=Path, default=DEFAULT_METRICS)
    ap.add_argument("--check", action="store_true", help="compare with the committed numbers, write nothing")
    args = ap.parse_args(argv)
    result = measure(args.val, args.test)
    print(json.dumps(result, indent=2))
    metrics = json.loads(args.metrics.read_text())
    if args.check:
        if metrics.get("localisation") != result:
            print(f"{args.metrics} 'localisation' differs from a fresh measurement", file=sys.stderr)
            return 1
        return 0
    if result["cell_threshold"] != CELL_THRESHOLD:
        print(
            f"note: the chosen cell threshold {result['cell_threshold']} is not "
            f"processors.localisation.CELL_THRESHOLD ({CELL_THRESHOLD}); update it",
            file=sys.stderr,
        )
    metrics["localisation"] = result
    args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
