"""Who is told of an alert, step by step: the on-call file (schemas/oncall.py) applied to
one alert at one moment. Pure: the notify stage computes a chain once, when the alert
opens, and again from the same opening time after a restart, so both give the same steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from radtriage.settings import OperatorNotifySettings, WebhookTarget
from schemas.oncall import Channel, Oncall, OncallError, Recipient, Rule, Step


@dataclass(frozen=True)
class Subject:
    """What the rules match on. The location is the alert's patient class ("" when unknown);
    the site is "" until alerts carry one (docs/ARCHITECTURE.md, Notification): rules
    naming sites or locations then do not match, rules that do not name them do."""

    finding: str
    site: str = ""
    location: str = ""


@dataclass(frozen=True)
class PlannedStep:
    index: int
    recipients: tuple[str, ...]
    # None: the fallback, the chain's end.
    timeout_s: float | None
    fallback: bool = False


def active_windows(oncall: Oncall, now: datetime) -> set[str]:
    local = now.astimezone(ZoneInfo(oncall.timezone))
    minute = local.hour * 60 + local.minute
    return {name for name, w in oncall.windows.items() if w.contains(local.weekday(), minute)}


def _matches(rule: Rule, subject: Subject, windows: set[str]) -> bool:
    def one_of(allowed: tuple[str, ...], value: str) -> bool:
        return not allowed or value.casefold() in {a.casefold() for a in allowed}

    return (
        one_of(rule.findings, subject.finding)
        and one_of(rule.sites, subject.site)
        and one_of(rule.locations, subject.location)
        and (not rule.windows or bool(windows & set(rule.windows)))
    )


def matching_rule(subject: Subject, oncall: Oncall, now: datetime) -> int | None:
    windows = active_windows(oncall, now)
    return next((i for i, r in enumerate(oncall.rules) if _matches(r, subject, windows)), None)


def recipients_for(subject: Subject, oncall: Oncall, now: datetime) -> tuple[PlannedStep, ...]:
    """The escalation chain for `subject` at `now`: the first matching rule's steps, then the
    fallback; only the fallback when no rule matches; () when neither exists."""
    index = matching_rule(subject, oncall, now)
    steps: list[PlannedStep] = []
    if index is not None:
        for i, step in enumerate(oncall.rules[index].chain):
            steps.append(PlannedStep(i, step.recipients, step.timeout_s))
    if oncall.fallback is not None:
        steps.append(PlannedStep(len(steps), oncall.fallback.recipients, None, fallback=True))
    return tuple(steps)


def usable_channels(
    recipient: Recipient, finding: str, webhooks: Mapping[str, WebhookTarget], email: bool
) -> tuple[Channel, ...]:
    """A recipient's channels that can carry this finding: a webhook that exists and whose
    `findings` include it (or are empty), an address while SMTP is configured."""
    usable = []
    for channel in recipient.channels:
        if channel.webhook is not None:
            target = webhooks.get(channel.webhook)
            if target is not None and (not target.findings or finding in target.findings):
                usable.append(channel)
        elif email:
            usable.append(channel)
    return tuple(usable)


# With no on-call file, each configured webhook is a recipient of its own, told once.
NO_ESCALATION_S = 24 * 3600.0


def webhooks_only(webhooks: Mapping[str, WebhookTarget]) -> Oncall | None:
    """The on-call picture of `notify.webhooks` alone: one step, every webhook, no escalation."""
    if not webhooks:
        return None
    recipients = {name: Recipient(display=name, channels=(Channel(webhook=name),)) for name in webhooks}
    return Oncall(
        recipients=recipients,
        rules=(Rule(chain=(Step(recipients=tuple(recipients), timeout_s=NO_ESCALATION_S),)),),
    )


def operators_recipient(
    operators: OperatorNotifySettings, oncall: Oncall | None, webhooks: Mapping[str, WebhookTarget]
) -> Recipient | None:
    """Who operator digests go to: the on-call file's recipient `operators.recipient` (its
    channels first), then the webhooks and addresses `operators` names. None: not configured.
    A name that is not there is an OncallError (the worker refuses to start on it)."""
    if not operators.configured:
        return None
    found: list[Channel] = []
    if operators.recipient:
        if oncall is None or operators.recipient not in oncall.recipients:
            raise OncallError(
                f"notify.operators.recipient {operators.recipient!r} is not a recipient of the on-call file"
            )
        found.extend(oncall.recipients[operators.recipient].channels)
    missing = sorted(set(operators.webhooks) - set(webhooks))
    if missing:
        raise OncallError(f"notify.operators.webhooks {missing} are not in notify.webhooks")
    found.extend(Channel(webhook=name) for name in operators.webhooks)
    found.extend(Channel(email=address) for address in operators.emails)
    unique = tuple(dict.fromkeys(found))
    return Recipient(display=operators.recipient or "radtriage operators", channels=unique)
