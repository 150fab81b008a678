"""The on-call file (`deploy/notify/oncall.yaml`): who is told of an alert, when, and who next.

- `windows`: named weekly time windows in the file's time zone (the rota: day, night,
  weekend); a window whose end is before its start crosses midnight and belongs to the
  day it starts on (Friday 20:00-08:00 is Friday night, until Saturday 08:00);
- `recipients`: named people or teams, each with its channels in the order they are tried
  (a channel down falls back to the next one of the same recipient);
- `rules`: tried in order, the first whose findings, sites, patient locations and windows
  all match an alert decides its escalation chain: steps, each with its recipients (all
  told at once) and how long they have to acknowledge before the next step is told;
- `fallback`: told when the last step's timeout passed with no acknowledgement (or when no
  rule matches), e.g. the operators' channel.

Validated on load; every error names the file and line it is about (YAML node marks), so
a broken edit is found before a worker starts with it (streams/stages/notify.py loads it
at start and refuses to start on an error).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CLOCK = re.compile(r"^([01][0-9]|2[0-4]):([0-5][0-9])$")


class OncallError(ValueError):
    """An on-call file that cannot be used; the message names the file and line."""


def minutes(clock: str) -> int:
    """'HH:MM' -> minutes since midnight; '24:00' is the end of the day (1440)."""
    m = _CLOCK.match(clock)
    if m is None or (m.group(1) == "24" and m.group(2) != "00"):
        raise ValueError(f"{clock!r} is not a time of day HH:MM (00:00 to 24:00)")
    return int(m.group(1)) * 60 + int(m.group(2))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(_Strict):
    days: tuple[Day, ...] = Field(min_length=1)
    start: str
    end: str

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        minutes(value)
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if minutes(self.start) == minutes(self.end):
            raise ValueError("start and end are equal: use 00:00 to 24:00 for a whole day")
        return self

    def contains(self, weekday: int, minute: int) -> bool:
        """Is (weekday 0=Monday, minute of the day) inside this window?"""
        start, end = minutes(self.start), minutes(self.end)
        for day in self.days:
            d = DAYS.index(day)
            if start < end:
                if weekday == d and start <= minute < end:
                    return True
            elif (weekday == d and minute >= start) or (weekday == (d + 1) % 7 and minute < end):
                return True
        return False


class Channel(_Strict):
    """Exactly one of: a webhook of `notify.webhooks` by name, or an e-mail address."""

    webhook: str | None = None
    email: str | None = Field(default=None, pattern=r"^[^@\s<>]+@[^@\s<>]+$")

    @model_validator(mode="after")
    def _one(self) -> Self:
        if (self.webhook is None) == (self.email is None):
            raise ValueError("a channel is either `webhook: <name>` or `email: <address>`")
        return self

    @property
    def label(self) -> str:
        return f"webhook:{self.webhook}" if self.webhook is not None else f"email:{self.email}"


class Recipient(_Strict):
    # Shown in messages and on the audit trail: a role or name of staff, never a patient.
    display: str = ""
    channels: tuple[Channel, ...] = Field(min_length=1)


class Step(_Strict):
    recipients: tuple[str, ...] = Field(min_length=1)
    # How long this step's recipients have to acknowledge before the next step is told.
    timeout_s: float = Field(gt=0)


class Rule(_Strict):
    # Empty = any. Sites and patient locations (the patient class: emergency, inpatient,
    # outpatient) match exactly, case-insensitively.
    findings: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    locations: tuple[str, ...] = ()
    windows: tuple[str, ...] = ()
    chain: tuple[Step, ...] = Field(min_length=1)


class Fallback(_Strict):
    recipients: tuple[str, ...] = Field(min_length=1)


class Oncall(_Strict):
    version: Literal[1] = 1
    # IANA time zone the windows are in (the hospital's wall clock).
    timezone: str = "UTC"
    windows: dict[str, Window] = Field(default_factory=dict)
    recipients: dict[str, Recipient] = Field(min_length=1)
    rules: tuple[Rule, ...] = ()
    fallback: Fallback | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name, e.g. Europe/Berlin)") from None
        return value

    def references(self) -> list[tuple[tuple[str | int, ...], str]]:
        """(path, message) for every name used and not defined: checked after the shapes."""
        wrong: list[tuple[tuple[str | int, ...], str]] = []
        for i, rule in enumerate(self.rules):
            for j, name in enumerate(rule.windows):
                if name not in self.windows:
                    wrong.append((("rules", i, "windows", j), f"no window named {name!r}"))
            for k, step in enumerate(rule.chain):
                for j, name in enumerate(step.recipients):
                    if name not in self.recipients:
                        wrong.append((("rules", i, "chain", k, "recipients", j), f"no recipient {name!r}"))
        if self.fallback is not None:
            for j, name in enumerate(self.fallback.recipients):
                if name not in self.recipients:
                    wrong.append((("fallback", "recipients", j), f"no recipient {name!r}"))
        return wrong

    def webhook_names(self) -> set[str]:
        return {c.webhook for r in self.recipients.values() for c in r.channels if c.webhook is not None}

    @classmethod
    def load(cls, path: Path) -> Oncall:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise OncallError(f"{path}: cannot read the on-call file: {exc}") from exc
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, where: str = "<on-call file>") -> Oncall:
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise OncallError(f"{where}{line}: not YAML: {getattr(exc, 'problem', exc)}") from None
        if node is None or not isinstance(data, dict):
            raise OncallError(f"{where}:1: the on-call file must be a mapping (version, recipients, rules)")
        try:
            oncall = cls.model_validate(data)
        except ValidationError as exc:
            lines = [
                f"{where}:{line_of(node, err['loc'])}: {'.'.join(map(str, err['loc'])) or '<root>'}: "
                f"{err['msg']}"
                for err in exc.errors()
            ]
            raise OncallError("\n".join(lines)) from None
        wrong = oncall.references()
        if wrong:
            raise OncallError(
                "\n".join(f"{where}:{line_of(node, p)}: {'.'.join(map(str, p))}: {m}" for p, m in wrong)
            )
        return oncall


def line_of(node: yaml.Node, loc: tuple[Any, ...]) -> int:
    """The 1-based line of the deepest node `loc` reaches (pydantic's error path)."""
    here = node
    for part in loc:
        if isinstance(here, yaml.MappingNode):
            found = next((v for k, v in here.value if k.value == str(part)), None)
            if found is None:
                # A missing field: the mapping that should hold it.
                break
            here = found
        elif isinstance(here, yaml.SequenceNode) and isinstance(part, int) and part < len(here.value):
            here = here.value[part]
        else:
            break
    return int(here.start_mark.line) + 1
