"""docs/ARCHITECTURE.md's stage table is the pipeline the app registers (no Kafka needed:
building the Faust app only declares agents, topics and tables)."""

from __future__ import annotations

import asyncio
import re

from radtriage.settings import REPO_ROOT, Settings
from streams.agents import build_pipeline

LANES = ("stat", "urgent", "routine")


CONDITIONAL = "(only when configured)"


def _table() -> dict[str, tuple[str, set[str]]]:
    """agent -> (stage module, its input topics) from the doc's 'Stages and their topics'."""
    return {a: (m, t) for a, (m, t, _) in _rows().items()}


def _conditional() -> set[str]:
    """Agents registered only when their stage is configured (CONDITIONAL in the agents cell)."""
    return {a for a, (_, _, only) in _rows().items() if only}


def _rows() -> dict[str, tuple[str, set[str], bool]]:
    text = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Stages and their topics", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, set[str], bool]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        module, agents, inputs = (
            cells[0],
            re.findall(r"`([^`]+)`", cells[1]),
            re.findall(r"`([^`]+)`", cells[2]),
        )
        for agent in agents:
            lane = agent.removeprefix("infer-") if agent.startswith("infer-") else ""
            rows[agent] = (
                module.strip("`"),
                {t.replace("<lane>", lane) for t in inputs},
                CONDITIONAL in cells[1],
            )
    return rows


def _registered(settings: Settings) -> dict[str, set[str]]:
    """agent -> its input topics, as the app registers them for `settings`."""
    # Building the pipeline makes the lanes' gRPC aio client, which wants the thread's event
    # loop: a loop of its own, whatever earlier tests of the session left set or closed.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        app = build_pipeline(settings).app
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    documented = _table()
    registered = {}
    for name, agent in app.agents.items():
        short = name.rsplit(".", 1)[-1] if name not in documented else name
        topics = set(agent.channel.topics) if hasattr(agent.channel, "topics") else set()
        registered[short] = {t.replace(settings.streams.app_id + "-", "<app>-") for t in topics}
    return registered


def _check(registered: dict[str, set[str]], expected: set[str]) -> None:
    documented = _table()
    assert set(registered) == expected, (sorted(registered), sorted(expected))
    for agent in expected:
        module, inputs = documented[agent]
        assert registered[agent] == inputs, (agent, module, registered[agent], inputs)
        assert (REPO_ROOT / "streams" / "stages" / module).exists(), module


def test_the_documented_stages_are_the_registered_agents_with_their_topics() -> None:
    _check(_registered(Settings()), set(_table()) - _conditional())


def test_notify_agents_are_registered_only_when_configured() -> None:
    """The notify row's agents (only when configured): none by default, all with a webhook."""
    notify = {a for a, (module, _) in _table().items() if module.startswith("notify")}
    assert notify and notify <= _conditional()
    settings = Settings.model_validate(
        {
            "notify": {
                "webhooks": [{"name": "ops", "url": "http://127.0.0.1:9/hook"}],
                "operators": {"webhooks": ["ops"]},
            }
        }
    )
    registered = _registered(settings)
    assert notify <= set(registered), (sorted(registered), sorted(notify))
    _check(registered, set(_table()) - (_conditional() - notify))
