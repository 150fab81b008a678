"""A suggested BI-RADS category for a mammography series, from the model's per-view outputs.

The mammography model (`mammo_birads`, models/mammo_birads/net.py) reads each standard view of
a screening series — RCC, RMLO, LCC, LMLO, in that channel order — on its own, and serves

* `birads_probabilities` (4, 6): per view, P(category 0..5); a row of zeros is a view the
  series does not hold (the model's input channel was empty);
* `probability`: the largest P(4) + P(5) over the views present, what the rule's threshold
  flags (the finding is positive when it is reached).

What is decided here, as the radiologist's report would (ACR BI-RADS Atlas, 5th ed.):

* each view's category: a view at or above the threshold is suspicious, 4 or 5 whichever
  is likelier; below it, the likeliest of 0-3. So a positive finding always has category
  4 or 5 and a negative one never does, whatever the two probabilities do near the
  threshold;
* each breast's category and the overall one: the most concerning by the ACR hierarchy
  for combining assessments, 1 < 2 < 3 < 6 < 0 < 4 < 5 (an incomplete view outranks a
  benign or probably-benign finding: the patient is recalled either way);
* category 6 (known biopsy-proven malignancy) is clinical knowledge no image shows; it is
  never suggested.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from schemas.findings import BiradsAssessment, BiradsCategory

BIRADS_OUTPUT = "birads_probabilities"
VIEWS: tuple[str, ...] = ("RCC", "RMLO", "LCC", "LMLO")
MODEL_CATEGORIES = 6  # the model's outputs: categories 0..5
CONCERN_ORDER: tuple[int, ...] = (1, 2, 3, 6, 0, 4, 5)  # least to most concerning
BREASTS: dict[str, str] = {"L": "left", "R": "right"}


def concern(category: int) -> int:
    """Rank of a category in the ACR hierarchy (higher = more concerning)."""
    return CONCERN_ORDER.index(category)


def overall_category(categories: Iterable[int]) -> int:
    """The combined assessment of several views or breasts: the most concerning one."""
    cats = list(categories)
    if not cats:
        raise ValueError("no categories to combine")
    bad = [c for c in cats if c not in CONCERN_ORDER]
    if bad:
        raise ValueError(f"BI-RADS categories are 0-6, got {bad}")
    return max(cats, key=concern)


def view_category(p: np.ndarray, suspicious: bool) -> BiradsCategory:
    """One view's category from its P(0..5): 4 or 5 if the view is suspicious, else 0-3."""
    if suspicious:
        return 4 if p[4] >= p[5] else 5
    best = int(np.argmax(p[:4]))
    assert best in (0, 1, 2, 3)
    return best  # type: ignore[return-value]


def assess(per_view: np.ndarray, threshold: float, positive: bool) -> BiradsAssessment | None:
    """The series' suggested category from the model's (4, 6) per-view probabilities;
    None when no view is present (nothing to assess).

    `positive` is the finding's flag (the served probability against the threshold): a
    view is suspicious when its P(4) + P(5) reaches the threshold and the finding is
    positive, and the likeliest view of a positive finding always is — so a float32
    probability a rounding step either side of the threshold cannot make the category
    contradict the flag."""
    if per_view.shape != (len(VIEWS), MODEL_CATEGORIES):
        raise ValueError(f"{BIRADS_OUTPUT} must be {len(VIEWS)} x {MODEL_CATEGORIES}, got {per_view.shape}")
    if not np.isfinite(per_view).all() or per_view.min() < 0 or per_view.max() > 1:
        raise ValueError(f"{BIRADS_OUTPUT} must be probabilities in [0, 1]")
    present = per_view.sum(axis=1) > 0  # a row of zeros: the series holds no such view
    if not present.any():
        return None
    suspicion = per_view[:, 4] + per_view[:, 5]
    cut = min(threshold, float(suspicion[present].max()))
    read: dict[str, tuple[BiradsCategory, float]] = {}
    for name, p, here, s45 in zip(VIEWS, per_view, present, suspicion, strict=True):
        if not here:
            continue
        category = view_category(p, positive and float(s45) >= cut)
        read[name] = (category, float(p[category]))
    by_breast: dict[str, BiradsCategory | None] = {}
    for letter in BREASTS:
        cats = [c for name, (c, _) in read.items() if name.startswith(letter)]
        by_breast[letter] = overall_category(cats) if cats else None  # type: ignore[assignment]
    overall: BiradsCategory = overall_category([c for c, _ in read.values()])  # type: ignore[assignment]
    setting = [name for name, (c, _) in read.items() if c == overall]
    probability = max(read[name][1] for name in setting)
    # A breast's finding (2-5, or an incomplete view) sets the category; 1 is no finding.
    sides = {BREASTS[name[0]] for name in setting}
    side = sides.pop() if overall != 1 and len(sides) == 1 else None
    return BiradsAssessment(
        category=overall,
        probability=round(min(max(probability, 0.0), 1.0), 4),
        side=side,  # type: ignore[arg-type]
        left_category=by_breast["L"],
        right_category=by_breast["R"],
        views=tuple(setting),
    )


def birads_of(maps: Mapping[str, np.ndarray], threshold: float, positive: bool) -> BiradsAssessment | None:
    """The assessment from a response's multi-value outputs; None for models without
    `birads_probabilities`."""
    per_view = maps.get(BIRADS_OUTPUT)
    if per_view is None:
        return None
    return assess(np.asarray(per_view, dtype=np.float64), threshold, positive)
