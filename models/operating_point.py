"""How every reference model's operating point is chosen and scored, in one place.

Each training script has three sets generated from disjoint seeds: training, validation
(only the threshold is chosen there) and test (only scored). The threshold rule is the same
for every route: a missed finding is the costly error of a triage system, so sensitivity is
never below TARGET_SENSITIVITY on validation, and within that the best sensitivity +
specificity, placed in the middle of the score gap (see `choose_threshold`).
"""

from __future__ import annotations

import numpy as np

# Operating point: never below this sensitivity on validation (see choose_threshold). A triage
# that misses a finding is the costly error; a false positive costs a radiologist a look.
TARGET_SENSITIVITY = 0.95
# Seed offsets keep the three sets disjoint for any --seed (phantoms are a function of the seed).
VAL_SEED_OFFSET, TEST_SEED_OFFSET = 1_000_003, 2_000_029
THRESHOLD_RULE = (
    f"max validation sensitivity+specificity with sensitivity >= {TARGET_SENSITIVITY}, "
    "middle of the optimal score gap (logit space)"
)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U), ties counted half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def choose_threshold(scores: np.ndarray, labels: np.ndarray, min_sensitivity: float) -> float:
    """The validation operating point: best sensitivity + specificity (Youden's J) among the
    thresholds that keep sensitivity >= `min_sensitivity`, placed in the middle (in logit
    space) of the score gap that achieves it.

    Why not simply "the highest threshold with sensitivity >= target": when the classes
    separate well, that sits right under the weakest detected bleeds and throws away
    sensitivity that costs no specificity; the middle of the gap has the most margin both
    ways for studies unlike the validation set.
    """
    order = np.sort(np.unique(scores))
    if len(order) == 0 or not (labels == 1).any() or not (labels == 0).any():
        return 0.5
    pos, neg = scores[labels == 1], scores[labels == 0]
    # Threshold t predicts bleed for score >= t; candidates are the distinct scores.
    sens = np.array([(pos >= t).mean() for t in order])
    spec = np.array([(neg < t).mean() for t in order])
    youden = np.where(sens >= min_sensitivity - 1e-9, sens + spec - 1.0, -np.inf)
    best = np.flatnonzero(youden == youden.max())
    # Widest run of consecutive optimal candidates; any t in (order[a - 1], order[b]] is optimal.
    runs = np.split(best, np.flatnonzero(np.diff(best) != 1) + 1)
    run = max(runs, key=len)
    a, b = int(run[0]), int(run[-1])
    lo = order[a - 1] if a > 0 else max(order[a] - 1e-3, 1e-6)
    hi = order[b]

    def logit(p: float) -> float:
        p = min(max(p, 1e-6), 1 - 1e-6)
        return float(np.log(p / (1 - p)))

    mid = 0.5 * (logit(float(lo)) + logit(float(hi)))
    return float(1.0 / (1.0 + np.exp(-mid)))


def operating_point(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    pred = scores >= threshold
    return {
        "sensitivity": float(pred[labels == 1].mean()),
        "specificity": float((~pred[labels == 0]).mean()),
        "accuracy": float((pred == (labels == 1)).mean()),
    }
