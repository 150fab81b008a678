"""The threshold rule every reference model's operating point comes from (models/operating_point.py)."""

from __future__ import annotations

import numpy as np

from models.operating_point import TARGET_SENSITIVITY, auc, choose_threshold, operating_point


def test_auc_counts_ties_half_and_needs_both_classes() -> None:
    assert auc(np.array([0.9, 0.1]), np.array([1, 0])) == 1.0
    assert auc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5
    assert np.isnan(auc(np.array([0.5, 0.7]), np.array([1, 1])))


def test_separable_classes_get_a_threshold_inside_the_gap_in_logit_space() -> None:
    scores = np.array([0.01, 0.02, 0.03, 0.9, 0.95, 0.99])
    labels = np.array([0, 0, 0, 1, 1, 1])
    t = choose_threshold(scores, labels, TARGET_SENSITIVITY)
    assert 0.03 < t < 0.9
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert abs(logit(t) - 0.5 * (logit(0.03) + logit(0.9))) < 1e-6
    assert operating_point(scores, labels, t) == {"sensitivity": 1.0, "specificity": 1.0, "accuracy": 1.0}


def test_sensitivity_is_never_traded_below_the_target_for_specificity() -> None:
    # 20 positives, one of them scored among the negatives: the rule must keep it (sensitivity
    # 0.95 needs 19 of 20; 20 of 20 is reachable only by giving up specificity).
    rng = np.random.default_rng(3)
    neg = rng.uniform(0.0, 0.4, 80)
    pos = np.concatenate([rng.uniform(0.6, 1.0, 19), [0.1]])
    scores, labels = np.concatenate([neg, pos]), np.array([0] * 80 + [1] * 20)
    t = choose_threshold(scores, labels, 1.0)
    point = operating_point(scores, labels, t)
    assert point["sensitivity"] == 1.0 and point["specificity"] < 1.0
    relaxed = operating_point(scores, labels, choose_threshold(scores, labels, TARGET_SENSITIVITY))
    assert relaxed["sensitivity"] >= TARGET_SENSITIVITY and relaxed["specificity"] == 1.0
