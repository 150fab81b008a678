"""The side of a finding, from a model's side output.

A model that localises by side declares an output `side_left_probability`: P(the
finding is on the patient's left | there is one), so 1 - it is P(right). Its value means
nothing for a study below the threshold (models/lvo_detector/CARD.md), so a negative
finding states no side ("none") rather than a guess. Models without the output have no
laterality at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from schemas.requests import Laterality

SIDE_OUTPUT = "side_left_probability"


@dataclass(frozen=True)
class Side:
    laterality: Laterality | None
    # P(the stated side); None unless laterality is left or right.
    probability: float | None = None


def side_of(outputs: Mapping[str, float], positive: bool) -> Side:
    """The stated side of a finding with these extra model outputs.

    A tie (exactly 0.5) is called left: some side must be named for a positive study, and
    the probability (0.5) says plainly that the model could not tell.
    """
    p_left = outputs.get(SIDE_OUTPUT)
    if p_left is None:
        return Side(None)
    if not positive:
        return Side("none")
    if p_left >= 0.5:
        return Side("left", p_left)
    return Side("right", 1.0 - p_left)
