"""Who the notify stage pages for an alert: the on-call picture from the settings (the
on-call file, else the configured webhooks alone) and what its rules match of an alert.
Loaded once at the worker's start (radtriage/worker.py checks it before anything runs)
and by both notifier stages (streams/stages/notify.py, streams/stages/notify_ops.py)."""

from __future__ import annotations

import logging

from processors.notify.rota import Subject, webhooks_only
from radtriage.settings import NotifySettings
from schemas.alerts import Alert
from schemas.oncall import Oncall, OncallError

log = logging.getLogger(__name__)


def subject(alert: Alert) -> Subject:
    """What the on-call rules match: the finding, and the patient class as the location
    (no site is carried on alerts yet)."""
    return Subject(alert.finding, location="" if alert.patient_class == "unknown" else alert.patient_class)


def load_oncall(n: NotifySettings) -> Oncall | None:
    """The on-call picture: the file, else the webhooks alone, else None (nothing configured).
    A broken file or a webhook it names that is not configured stops the worker's start
    (OncallError naming the file and line; radtriage/worker.py checks it first)."""
    webhooks = n.named_webhooks()
    if n.oncall_file is None:
        return webhooks_only(webhooks)
    oncall = Oncall.load(n.oncall_file)
    missing = sorted(oncall.webhook_names() - set(webhooks))
    if missing:
        raise OncallError(f"{n.oncall_file}: webhook(s) {missing} are not in notify.webhooks")
    if not n.smtp.host and any(c.email for r in oncall.recipients.values() for c in r.channels):
        log.warning("notify: the on-call file names e-mail addresses but notify.smtp.host is empty")
    return oncall
