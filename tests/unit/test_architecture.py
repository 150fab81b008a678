"""docs/ARCHITECTURE.md's stage table is the pipeline the app registers (no Kafka needed:
building the Faust app only declares agents, topics and tables)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from radtriage.settings import REPO_ROOT, Settings
from tests.support.pipeline import built_app

LANES = ("stat", "urgent", "routine")
# An agents cell ending "(only with `<setting>`)": registered only when that setting is set.
ONLY_WITH = re.compile(r"\(only with `([a-z0-9_.]+)`\)")
# The least configuration that sets each condition the table names.
CONDITIONS: dict[str, dict[str, Any]] = {
    "dispatch.destinations": {
        "dispatch": {
            "destinations": [{"name": "pacs", "host": "127.0.0.1", "port": 11112, "ae_title": "PACS"}]
        }
    },
    "ehr.hl7": {"ehr": {"hl7": {"host": "127.0.0.1", "port": 2575}}},
    "ehr.fhir": {"ehr": {"fhir": {"base_url": "http://127.0.0.1:1/fhir"}}},
    "notify": {"notify": {"webhooks": [{"name": "ed", "url": "http://127.0.0.1:9/hook"}]}},
    "notify.operators": {
        "notify": {
            "webhooks": [{"name": "ops", "url": "http://127.0.0.1:9/hook"}],
            "operators": {"webhooks": ["ops"]},
        }
    },
}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = out[key] + [v for v in value if v not in out[key]]
        else:
            out[key] = value
    return out


def _settings(configured: frozenset[str]) -> Settings:
    data: dict[str, Any] = {}
    for condition in sorted(configured):
        data = _merge(data, CONDITIONS[condition])
    return Settings.model_validate(data)


def _conditions() -> set[str]:
    text = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    return set(ONLY_WITH.findall(text.split("## Stages and their topics", 1)[1].split("\n## ", 1)[0]))


def _table(configured: frozenset[str] = frozenset()) -> dict[str, tuple[str, set[str]]]:
    """agent -> (stage module, its input topics) from the doc's 'Stages and their topics',
    the rows of optional stages included when their setting is in `configured`."""
    text = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Stages and their topics", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, set[str]]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        condition = ONLY_WITH.search(cells[1])
        if condition is not None and condition.group(1) not in configured:
            continue
        module, agents, inputs = (
            cells[0],
            re.findall(r"`([^`]+)`", ONLY_WITH.sub("", cells[1])),
            re.findall(r"`([^`]+)`", cells[2]),
        )
        for agent in agents:
            lane = agent.removeprefix("infer-") if agent.startswith("infer-") else ""
            rows[agent] = (module.strip("`"), {t.replace("<lane>", lane) for t in inputs})
    return rows


def test_every_condition_the_table_names_can_be_configured_here() -> None:
    assert _conditions() <= set(CONDITIONS), sorted(_conditions() - set(CONDITIONS))


@pytest.mark.parametrize(
    "configured",
    [frozenset(), *(frozenset({c}) for c in sorted(CONDITIONS)), frozenset(CONDITIONS)],
    ids=["default", *sorted(CONDITIONS), "all"],
)
def test_the_documented_stages_are_the_registered_agents_with_their_topics(
    configured: frozenset[str],
) -> None:
    settings = _settings(configured)
    app = built_app(settings)
    # "notify.operators" needs a webhook, which is "notify" too.
    implied = configured | ({"notify"} if "notify.operators" in configured else set())
    documented = _table(frozenset(implied))
    registered = {}
    for name, agent in app.agents.items():
        short = name.rsplit(".", 1)[-1] if name not in documented else name
        topics = set(agent.channel.topics) if hasattr(agent.channel, "topics") else set()
        registered[short] = {t.replace(settings.streams.app_id + "-", "<app>-") for t in topics}
    assert set(registered) == set(documented), (sorted(registered), sorted(documented))
    for agent, (module, inputs) in documented.items():
        assert registered[agent] == inputs, (agent, module, registered[agent], inputs)
        assert (REPO_ROOT / "streams" / "stages" / module).exists(), module
