"""docs/ARCHITECTURE.md's stage table is the pipeline the app registers (no Kafka needed:
building the Faust app only declares agents, topics and tables): under the default
settings without the rows "only when configured", and with a PACS destination and an HL7
endpoint configured, every row."""

from __future__ import annotations

import asyncio
import re

import faust
import pytest

from radtriage.settings import REPO_ROOT, Settings
from streams.agents import build_pipeline

LANES = ("stat", "urgent", "routine")
CONDITIONAL = "(only when configured)"


def _table() -> dict[str, tuple[str, set[str], bool]]:
    """agent -> (stage module, its input topics, only when configured) from the doc's
    'Stages and their topics'."""
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
            topics = {t.replace("<lane>", lane) for t in inputs}
            rows[agent] = (module.strip("`"), topics, CONDITIONAL in cells[1])
    return rows


def _app(settings: Settings) -> faust.App:
    # Building the pipeline makes the lanes' gRPC aio client, which wants the thread's event
    # loop: a loop of its own, whatever earlier tests of the session left set or closed.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return build_pipeline(settings).app
    finally:
        asyncio.set_event_loop(None)
        loop.close()


CONFIGURED = {
    "dispatch": {"destinations": [{"name": "pacs", "host": "127.0.0.1", "port": 11112, "ae_title": "PACS"}]},
    "ehr": {"hl7": {"host": "127.0.0.1", "port": 2575}},
}


@pytest.mark.parametrize("configured", [False, True], ids=["defaults", "pacs-and-hl7-configured"])
def test_the_documented_stages_are_the_registered_agents_with_their_topics(configured: bool) -> None:
    settings = Settings.model_validate(CONFIGURED) if configured else Settings()
    app = _app(settings)
    documented = {
        agent: (module, inputs)
        for agent, (module, inputs, conditional) in _table().items()
        if configured or not conditional
    }
    registered = {}
    for name, agent in app.agents.items():
        short = name.rsplit(".", 1)[-1] if name not in documented else name
        topics = set(agent.channel.topics) if hasattr(agent.channel, "topics") else set()
        registered[short] = {t.replace(settings.streams.app_id + "-", "<app>-") for t in topics}
    assert set(registered) == set(documented), (sorted(registered), sorted(documented))
    for agent, (module, inputs) in documented.items():
        assert registered[agent] == inputs, (agent, module, registered[agent], inputs)
        assert (REPO_ROOT / "streams" / "stages" / module).exists(), module
