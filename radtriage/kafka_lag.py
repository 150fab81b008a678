"""Consumer lag from offsets: one arithmetic for `/metrics` and `radtriage status`."""

from __future__ import annotations

from collections.abc import Mapping


def lag_by_lane(
    topic_lane: Mapping[str, str],
    end: Mapping[tuple[str, int], int],
    committed: Mapping[tuple[str, int], int | None],
    beginning: Mapping[tuple[str, int], int],
) -> dict[str, int]:
    """Messages on each lane's topic that the group has not committed yet.

    A partition the group never committed is read from its beginning (Faust's
    auto_offset_reset is earliest), so all of it that is still retained is lag."""
    lag = dict.fromkeys(topic_lane.values(), 0)
    for (topic, partition), end_offset in end.items():
        done = committed.get((topic, partition))
        if done is None or done < 0:
            done = beginning.get((topic, partition), 0)
        lag[topic_lane[topic]] += max(end_offset - done, 0)
    return lag
