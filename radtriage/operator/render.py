"""The operator page as HTML, rendered on the server from a snapshot (pure functions).

The page is split into sections (`alerts`, `worklist`, `finished`, `deadletters`,
`status`); the first load renders them all, and each push over SSE sends them again
for the script to swap in, so there is one rendering, here. Times are rendered as
`<time data-since>` elements the script keeps counting. Everything interpolated is
escaped; nothing here can reach a patient id (the view holds none).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape

from radtriage.operator.view import LANES, Ack, AlertRow, LetterView, Snapshot, Told, WorkItem
from radtriage.operator.waterfall import Waterfall

SECTIONS = ("status", "alerts", "worklist", "finished", "deadletters")
LANE_TITLES = {"stat": "STAT", "urgent": "Urgent", "routine": "Routine"}


def e(value: object) -> str:
    return escape(str(value), quote=True)


def short_uid(uid: str) -> str:
    """Enough of a UID to tell studies apart at a glance; the whole one is in the tooltip."""
    return uid if len(uid) <= 22 else f"{uid[:8]}…{uid[-12:]}"


def duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"


def since(at: datetime, now: datetime) -> str:
    iso = at.isoformat()
    return f'<time datetime="{e(iso)}" data-since="{e(iso)}">{e(duration((now - at).total_seconds()))}</time>'


def clock(at: datetime) -> str:
    return at.strftime("%H:%M:%S") + "Z"


def uid_html(uid: str) -> str:
    return f'<span class="uid" title="{e(uid)}">{e(short_uid(uid))}</span>'


# -- sections ---------------------------------------------------------------------------------


def status_html(snap: Snapshot) -> str:
    status = snap.status
    if status.available:
        text = '<span class="pill ok">Event log: live</span>'
    else:
        text = (
            '<span class="pill down" role="alert">Event log unavailable — retrying</span>'
            f'<span class="detail">{e(status.detail)}</span>'
        )
    bad = sum(snap.unreadable.values())
    if bad:
        topics = ", ".join(f"{e(t)} ×{n}" for t, n in sorted(snap.unreadable.items()))
        text += f'<span class="detail" title="{topics}">{bad} unreadable message(s) ignored</span>'
    return text


def _told_html(told: Sequence[Told], now: datetime) -> str:
    if not told:
        return ""
    items = "; ".join(
        f"{e(t.recipient)} via {e(t.channel)} {since(t.at, now)} ago (step {t.step + 1})" for t in told
    )
    return f'<div class="a4 told">Notified: {items}</div>'


def _alert_html(
    alert: AlertRow, ack: Ack | None, now: datetime, told: Sequence[Told] = (), overdue: bool = False
) -> str:
    cls = "acked" if ack is not None else "unacked overdue" if overdue else "unacked"
    if ack is not None:
        ack_html = (
            f'<div class="ack-state">✓ Acknowledged by <b class="ack-by">{e(ack.by)}</b> '
            f"<span>{since(ack.at, now)} ago</span></div>"
        )
    else:
        ack_html = (
            f'<button type="button" class="ack-btn" data-alert-id="{e(alert.alert_id)}" '
            f'data-label="{e(alert.finding)} · {e(alert.accession_number or short_uid(alert.study_uid))}">'
            "Acknowledge</button>"
        )
    return (
        f'<article class="alert {cls}" data-alert-id="{e(alert.alert_id)}" data-study="{e(alert.study_uid)}">'
        f'<div class="finding f-{e(alert.finding.lower())}">{e(alert.finding)}</div>'
        '<div class="alert-main">'
        f'<div class="a1"><span class="prob">p = {alert.probability:.3f}</span>'
        f'<span class="thr">threshold {alert.threshold:.3f}</span>'
        f'<span class="lane l-{e(alert.lane)}">{e(LANE_TITLES.get(alert.lane, alert.lane))}</span></div>'
        f'<div class="a2">Accession <b>{e(alert.accession_number or "—")}</b> · '
        f"Study {uid_html(alert.study_uid)}</div>"
        f'<div class="a3">{e(alert.model_name)} v{e(alert.model_version)} · '
        f"scan received {since(alert.received_at, now)} ago · "
        f"alerted {since(alert.alerted_at, now)} ago</div>"
        + _told_html(told, now)
        + ('<div class="a4 late">Not acknowledged within the escalation step</div>' if overdue else "")
        + "</div>"
        f'<div class="alert-ack">{ack_html}</div>'
        "</article>"
    )


def alerts_html(snap: Snapshot) -> str:
    if not snap.alerts:
        return '<p class="empty">No alerts in the lookback window.</p>'
    open_count = sum(1 for _, ack in snap.alerts if ack is None)
    head = f'<p class="count">{open_count} unacknowledged of {len(snap.alerts)}</p>'
    return head + "".join(
        _alert_html(a, ack, snap.now, snap.notified.get(a.alert_id, ()), a.alert_id in snap.overdue)
        for a, ack in snap.alerts
    )


def _work_html(item: WorkItem, now: datetime) -> str:
    upgraded = f' <span class="up">↑ from {e(item.upgraded_from)}</span>' if item.upgraded_from else ""
    return (
        f'<tr class="study-row" data-study="{e(item.study_uid)}">'
        f"<td>{e(item.accession_number or '—')}</td>"
        f'<td>{uid_html(item.study_uid)}<div class="sub">{e(item.model_name)} ({e(item.finding)})'
        f"{upgraded}</div></td>"
        f'<td class="num">{since(item.routed_at, now)}</td></tr>'
    )


def worklist_html(snap: Snapshot) -> str:
    cols = []
    for lane in LANES:
        items = snap.lanes.get(lane, ())
        rows = "".join(_work_html(i, snap.now) for i in items) or (
            '<tr><td colspan="3" class="empty">nothing waiting</td></tr>'
        )
        cols.append(
            f'<div class="lane-col" data-lane="{lane}"><h3 class="l-{lane}">{LANE_TITLES[lane]} '
            f'<span class="n">{len(items)}</span></h3><table><thead><tr><th>Accession</th>'
            '<th>Study · model</th><th class="num">Waiting</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></div>"
        )
    return "".join(cols)


def finished_html(snap: Snapshot) -> str:
    if not snap.finished:
        return '<p class="empty">No findings yet.</p>'
    rows = []
    for f in snap.finished:
        verdict = '<span class="pos">positive</span>' if f.positive else '<span class="neg">negative</span>'
        rows.append(
            f'<tr class="study-row" data-study="{e(f.study_uid)}">'
            f"<td>{e(f.accession_number or '—')}</td><td>{uid_html(f.study_uid)}</td>"
            f'<td>{e(f.finding)} {verdict}</td><td class="num">{f.probability:.3f} / {f.threshold:.3f}</td>'
            f'<td><span class="lane l-{e(f.lane)}">{e(LANE_TITLES.get(f.lane, f.lane))}</span></td>'
            f"<td>{e(f.model_name)} v{e(f.model_version)}</td>"
            f'<td class="num">{e(duration((f.inferred_at - f.ready_at).total_seconds()))}</td>'
            f'<td class="num">{since(f.inferred_at, snap.now)} ago</td></tr>'
        )
    return (
        "<table><thead><tr><th>Accession</th><th>Study</th><th>Finding</th>"
        '<th class="num">p / threshold</th><th>Lane</th><th>Model</th><th class="num">ready→finding</th>'
        f'<th class="num">Finished</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _letter_html(lv: LetterView, now: datetime) -> str:
    row, letter = lv.row, lv.row.letter
    c = row.coords
    if lv.state == "replayable":
        action = (
            f'<button type="button" class="replay-btn" data-topic="{e(c.topic)}" '
            f'data-partition="{c.partition}" data-offset="{c.offset}">Replay</button>'
        )
    elif lv.state == "replayed":
        action = '<span class="replayed">replayed</span>'
    else:
        action = f'<span class="noreplay" title="{e(lv.reason)}">cannot replay</span>'
    study = letter.study_uid or ""
    study_cell = uid_html(study) if study else "—"
    attrs = f' class="study-row" data-study="{e(study)}"' if study else ""
    return (
        f'<tr{attrs} data-letter="{e(str(c))}"><td class="num">{since(letter.at, now)} ago</td>'
        f"<td><code>{e(letter.stage)}</code></td><td>{e(letter.source_topic)}</td><td>{study_cell}</td>"
        f'<td class="reason">{e(letter.error[:300])}</td><td class="act">{action}</td></tr>'
    )


def deadletters_html(snap: Snapshot) -> str:
    if not snap.letters:
        return '<p class="empty">No dead letters.</p>'
    rows = "".join(_letter_html(lv, snap.now) for lv in snap.letters)
    return (
        '<table><thead><tr><th class="num">When</th><th>Stage</th><th>From topic</th><th>Study</th>'
        f"<th>Reason</th><th></th></tr></thead><tbody>{rows}</tbody></table>"
    )


def sections(snap: Snapshot) -> dict[str, str]:
    return {
        "status": status_html(snap),
        "alerts": alerts_html(snap),
        "worklist": worklist_html(snap),
        "finished": finished_html(snap),
        "deadletters": deadletters_html(snap),
    }


# -- the waterfall ----------------------------------------------------------------------------


def _bar(start_s: float, length_s: float, total_s: float, cls: str) -> str:
    total = total_s or 1.0
    left = min(max(start_s / total * 100, 0.0), 100.0)
    width = min(max(length_s / total * 100, 0.4), 100.0 - left)
    return f'<div class="bar {cls}" style="left:{left:.2f}%;width:{width:.2f}%"></div>'


def waterfall_html(w: Waterfall) -> str:
    head = (
        f'<div class="wf-head" data-study="{e(w.study_uid)}"><h3>Study {uid_html(w.study_uid)} · accession '
        f"<b>{e(w.accession_number or '—')}</b>"
        + (
            f' · <span class="lane l-{e(w.lane)}">{e(LANE_TITLES.get(w.lane, w.lane))}</span>'
            if w.lane
            else ""
        )
        + '</h3><button type="button" class="wf-close" aria-label="close">×</button></div>'
    )
    if w.dead_letter_stage:
        head += f'<p class="wf-dead">dead-lettered at stage <code>{e(w.dead_letter_stage)}</code></p>'
    rows = []
    previous = 0.0
    for s in w.stages:
        if s.at is None or s.offset_s is None:
            rows.append(
                f'<tr class="wf-stage missing" data-stage="{s.name}"><td>{s.name}</td><td colspan="3">—</td>'
            )
            rows.append('<td class="track"></td></tr>')
            continue
        step = f"+{duration(s.step_s)}" if s.step_s is not None else ""
        if s.step_s is not None and s.step_s < 0:
            # Report and alert are separate agents on the same finding: either may come first.
            step = f"{duration(-s.step_s)} before"
        bar = _bar(min(previous, s.offset_s), abs(s.offset_s - previous), w.total_s, "stage")
        rows.append(
            f'<tr class="wf-stage" data-stage="{s.name}"><td>{s.name}</td><td class="num">{clock(s.at)}</td>'
            f'<td class="num">{duration(s.offset_s)}</td><td class="num">{step}</td>'
            f'<td class="track">{bar}</td></tr>'
        )
        previous = s.offset_s
    table = (
        '<table class="wf"><thead><tr><th>Stage</th><th class="num">At (UTC)</th>'
        '<th class="num">Since received</th>'
        f'<th class="num">Step</th><th class="track">0 → {duration(w.total_s)}</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    if w.spans:
        span_rows = "".join(
            f'<tr class="wf-span"><td>{e(g.name)}{f" ×{g.count}" if g.count > 1 else ""}'
            f"{' ⚠' if g.errors else ''}</td><td>{e(g.service)}</td>"
            f'<td class="num">{duration(start)}</td><td class="num">{duration(length)}</td>'
            f'<td class="track">{_bar(start, length, w.total_s, "span-err" if g.errors else "span")}'
            "</td></tr>"
            for g, start, length in w.spans
        )
        table += (
            '<h4>Spans (trace file)</h4><table class="wf"><thead><tr><th>Span</th><th>Service</th>'
            '<th class="num">Start</th><th class="num">Duration</th><th class="track"></th></tr></thead>'
            f"<tbody>{span_rows}</tbody></table>"
        )
    else:
        table += '<p class="empty">No spans for this study in the trace file.</p>'
    return head + table


# -- the page ---------------------------------------------------------------------------------


def page_html(snap: Snapshot, static_version: str) -> str:
    parts = sections(snap)
    v = e(static_version)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>radtriage · operator</title>
<link rel="stylesheet" href="/operator/static/operator.css?v={v}">
<script src="/operator/static/operator.js?v={v}" defer></script>
</head><body data-version="{snap.version}" data-now="{e(snap.now.isoformat())}">
<header><h1>radtriage <span>operator</span></h1>
<div id="status" aria-live="polite">{parts["status"]}</div>
<div id="conn" class="pill ok">connected</div>
<label class="who">Acknowledging as
<input id="who" autocomplete="off" maxlength="64" placeholder="name / initials"></label>
</header>
<main>
<section class="panel alerts-panel"><h2>Alerts</h2><div id="alerts">{parts["alerts"]}</div></section>
<section class="panel" id="waterfall-panel" hidden><h2>Latency waterfall</h2>
<div id="waterfall"></div></section>
<section class="panel"><h2>Worklist by lane</h2>
<div id="worklist" class="lanes">{parts["worklist"]}</div></section>
<section class="panel"><h2>Recently finished</h2><div id="finished">{parts["finished"]}</div></section>
<section class="panel"><h2>Dead letters</h2><div id="deadletters">{parts["deadletters"]}</div></section>
</main>
<dialog id="ack-dialog"><form method="dialog" id="ack-form">
<h2>Acknowledge alert</h2><p id="ack-what"></p>
<label>Your name or initials <input id="ack-by" name="by" required maxlength="64" autocomplete="off"></label>
<p id="ack-error" class="error" role="alert"></p>
<div class="buttons"><button type="button" id="ack-cancel">Cancel</button>
<button type="submit" id="ack-confirm" class="primary">Acknowledge</button></div>
</form></dialog>
<p class="phi-note">Ids and codes only: no patient identifiers are shown. Not for clinical use.</p>
</body></html>
"""
