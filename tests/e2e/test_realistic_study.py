"""End to end with real-shaped studies (issue 16): a head CT as a scanner sends it — scout,
5 mm soft tissue, thin soft tissue, bone kernel, dose SR (models/realistic_study.py) —
through `radtriage up`, sent with dcmtk's storescu in one association (SR first) or one
association per series in either order of reconstructions, or archived compressed in a
real Orthanc and forwarded by it, as a PACS does.

What must come out, per study: every C-STORE accepted (the SR too), no dead letter,
exactly one ICH alert for a bleed and none for a normal head, and the finding and the FHIR
report naming the 5 mm soft-tissue series the model was built for — not the scout, not
the bone kernel — with the slice range in ascending position order whatever way the
scanner numbered its instances. A study read more than once (a better series arrived
later) carries its later findings as amendments, never as a second decision.

Slice counts are reduced (thin 48, 5 mm 32, bone 24, scout 2, SR 1; 512 x 512) to keep
CI time down; bench/realistic_study.py sends the full-size study. On failure the message
lists everything the test saw for each study: alerts, findings with the series they read,
reports, requests, dead letters, storescu's answers.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.realistic_study import SeriesKind, StudyManifest, TransferSyntax, write_realistic_head_study
from tests.e2e.harness import OUTCOME_TIMEOUT_S, Outputs, Stack
from tests.support.dicom import storescu_send
from tests.support.orthanc import Orthanc

pytestmark = pytest.mark.e2e

THIN, AXIAL, BONE = 48, 32, 24
# After the first outcome, keep reading: a second alert, an amended report or a dead letter
# for a later association would arrive now (the assembly quiet period is 4 s in the harness).
GRACE_S = 15.0
# The sends: one list of series per storescu call (= one association).
SENDS: dict[str, list[list[SeriesKind]]] = {
    # A PACS forwarding a finished study: everything at once, the dose SR first.
    "one_association": [["dose_sr", "scout", "axial", "thin", "bone"]],
    # A scanner sending each reconstruction as it is made, the thin one first ...
    "per_series_thin_first": [["scout"], ["thin"], ["axial"], ["bone"], ["dose_sr"]],
    # ... or the 5 mm one first.
    "per_series_5mm_first": [["scout"], ["axial"], ["thin"], ["bone"], ["dose_sr"]],
}
# Each scenario's bleed and normal study vary the scanner conventions, so between them the
# bleeds have InstanceNumbers both rising and falling along z, signed and unsigned pixels.
VARIANTS: dict[str, dict[bool, dict[str, Any]]] = {
    "one_association": {
        True: {"signed": True, "instance_order": "ascending", "vendor": "siemens"},
        False: {"signed": False, "instance_order": "descending", "vendor": "ge"},
    },
    "per_series_thin_first": {
        True: {"signed": False, "instance_order": "descending", "vendor": "siemens"},
        False: {"signed": True, "instance_order": "ascending", "vendor": "ge"},
    },
    "per_series_5mm_first": {
        True: {"signed": True, "instance_order": "descending", "vendor": "ge"},
        False: {"signed": False, "instance_order": "ascending", "vendor": "siemens"},
    },
}


class AllOutputs(Outputs):
    """The harness's reader plus the findings (which series a model read) and the instances
    (in which transfer syntax each arrived)."""

    TOPICS = (*Outputs.TOPICS, "triage.findings", "imaging.instances")


COMPRESSED_UIDS: dict[str, str] = {
    "jpeg-ls": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (SV1)
}


@dataclass
class Sent:
    label: str
    bleed: bool
    manifest: StudyManifest
    sends: list[tuple[list[SeriesKind], int, str]] = field(default_factory=list)  # kinds, rc, output

    @property
    def uid(self) -> str:
        return self.manifest.study_uid


def _write(tmp: Path, label: str, bleed: bool, seed: int, prefix: str = "RS", **options: Any) -> Sent:
    """A reduced-size realistic study; `options`: write_realistic_head_study's scanner conventions."""
    manifest = write_realistic_head_study(
        tmp / label,
        bleed=bleed,
        rng=np.random.default_rng(seed),
        axial_slices=AXIAL,
        thin_slices=THIN,
        bone_slices=BONE,
        accession=f"{prefix}{seed}",
        patient_id=f"MRN-{prefix}{seed}",
        patient_name="Test^Realistic",
        **options,
    )
    return Sent(label, bleed, manifest)


def _storescu_send(stack: Stack, files: Sequence[Path]) -> tuple[int, str]:
    """storescu's exit status and what it said about anything that failed. -v: at its default
    log level storescu says nothing about a C-STORE the peer refused, it only exits 1."""
    # TCP_NODELAY: without it dcmtk waits for a delayed ACK (~45 ms) on every C-STORE.
    env = {**os.environ, "TCP_NODELAY": "1"}
    done = storescu_send(stack.dicom_port, files, calling="E2E_REAL", verbose=True, timeout=300, env=env)
    said = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if re.search(r"^[EFW]: |Failed|Refused|Reject|Abort|Status: (?!Success)", line)
    ]
    return done.returncode, "\n".join(said[:12])


def _series_name(sent: Sent, series_uid: str) -> str:
    for s in sent.manifest.series:
        if s.series_uid == series_uid:
            return f"{s.kind} (#{s.series_number} {s.description!r})"
    return f"unknown series {series_uid}"


def _dead_letters(out: Outputs, uid: str) -> list[dict[str, Any]]:
    # Intake dead letters may not know the study yet: their payload still names it.
    return [
        d
        for t, d, _ in out.seen
        if t == "triage.deadletter" and (d.get("study_uid") == uid or uid in str(d.get("payload", "")))
    ]


def _report_series_uid(result: dict[str, Any]) -> str | None:
    obs = result["bundle"]["entry"][1]["resource"]
    for c in obs.get("component", []):
        if c.get("code", {}).get("text") == "DICOM Series Instance UID":
            return str(c.get("valueString"))
    return None


def _report_position_range(result: dict[str, Any]) -> tuple[float, float] | None:
    obs = result["bundle"]["entry"][1]["resource"]
    for c in obs.get("component", []):
        if any(cd.get("code") == "slice-range-position" for cd in c.get("code", {}).get("coding", [])):
            return float(c["valueRange"]["low"]["value"]), float(c["valueRange"]["high"]["value"])
    return None


def _describe(sent: Sent, out: Outputs) -> str:
    uid = sent.uid
    lines = [
        f"--- {sent.label} study {uid} (bleed z {sent.manifest.bleed_z_mm}, {sent.manifest.instance_order})"
    ]
    for kinds, rc, text in sent.sends:
        lines.append(f"  storescu {'+'.join(kinds)}: rc={rc}" + (f" {text.strip()[-300:]!r}" if rc else ""))
    for d in out.of("imaging.studies", uid):
        ser = ", ".join(
            f"{_series_name(sent, s['series_uid'])} x{len(s['instance_uris'])}" for s in d["series"]
        )
        lines.append(f"  ready ({d['ready_reason']}): {ser}")
    for lane in ("stat", "urgent", "routine"):
        for d in out.of(f"triage.requests.{lane}", uid):
            amends = f" amends {d['amends_request_id']}" if d.get("amends_request_id") else ""
            lines.append(
                f"  request [{lane}] {d.get('rule_id')}: {_series_name(sent, d['series_uid'])}{amends}"
            )
    for d in out.of("triage.findings", uid):
        lines.append(
            f"  finding {d['finding']} positive={d['positive']} p={d['probability']:.3f} on "
            f"{_series_name(sent, d['series_uid'])}; finding says #{d.get('series_number')} "
            f"{d.get('series_description')!r}; slice_range={d.get('slice_range')}"
            + (f"; amends {d['amends_request_id']}" if d.get("amends_request_id") else "")
        )
    for d in out.of("triage.results.fhir", uid):
        report = d["bundle"]["entry"][0]["resource"]
        series = _report_series_uid(d)
        lines.append(
            f"  report {report.get('status')}: series {_series_name(sent, series or '')}, "
            f"positions {_report_position_range(d)}: {report.get('conclusion', '')[:160]!r}"
        )
    for d in out.of("triage.alerts.ich", uid):
        lines.append(f"  ALERT p={d['probability']:.3f} slice_range={d.get('slice_range')}")
    for d in _dead_letters(out, uid):
        lines.append(f"  DEAD LETTER {d.get('stage')}: {d.get('error')}")
    return "\n".join(lines)


def _settled(sent: Sent, out: Outputs) -> bool:
    if _dead_letters(out, sent.uid):
        return True
    if not out.of("triage.results.fhir", sent.uid):
        return False
    return not sent.bleed or bool(out.of("triage.alerts.ich", sent.uid))


def _problems(sent: Sent, out: Outputs) -> list[str]:
    """Everything wrong with one study's outcome, as sentences (empty: all as expected)."""
    uid, m, label = sent.uid, sent.manifest, sent.label
    axial = m.of("axial")
    wrong: list[str] = []
    for kinds, rc, text in sent.sends:
        if rc != 0:
            wrong.append(f"{label}: storescu {'+'.join(kinds)} exited {rc}: {text.strip()[-300:]}")
    for d in _dead_letters(out, uid):
        wrong.append(f"{label}: dead letter at {d.get('stage')}: {d.get('error')}")
    alerts = out.of("triage.alerts.ich", uid)
    if sent.bleed and len(alerts) != 1:
        wrong.append(f"{label}: {len(alerts)} ICH alerts, expected exactly 1")
    if not sent.bleed and alerts:
        wrong.append(f"{label}: {len(alerts)} ICH alert(s) for a normal head")

    findings = out.of("triage.findings", uid)
    if not findings:
        wrong.append(f"{label}: no finding")
    for f in findings:
        if f["series_uid"] in (m.of("scout").series_uid, m.of("bone").series_uid, m.of("dose_sr").series_uid):
            wrong.append(f"{label}: a finding read {_series_name(sent, f['series_uid'])}")
    # One decision per study: findings after the first are amendments of an earlier request.
    firsts = [f for f in findings if not f.get("amends_request_id")]
    if len(firsts) > 1:
        wrong.append(f"{label}: {len(firsts)} findings that amend nothing (two decisions for one study)")
    if findings:
        last = findings[-1]
        named = (last["series_uid"], last.get("series_number"), last.get("series_description"))
        if named != (axial.series_uid, axial.series_number, axial.description):
            wrong.append(
                f"{label}: the last finding names {named[1]!r} {named[2]!r} "
                f"({_series_name(sent, last['series_uid'])}), expected the 5 mm series "
                f"#{axial.series_number} {axial.description!r}"
            )
        if last["positive"] != sent.bleed:
            wrong.append(
                f"{label}: the last finding is positive={last['positive']} (p {last['probability']:.3f})"
            )
        wrong += _slice_range_problems(sent, last)

    reports = out.of("triage.results.fhir", uid)
    if not reports:
        wrong.append(f"{label}: no FHIR report")
    for r in reports:
        series = _report_series_uid(r)
        if series in (m.of("scout").series_uid, m.of("bone").series_uid):
            wrong.append(f"{label}: a report names {_series_name(sent, series or '')}")
    if reports:
        last_series = _report_series_uid(reports[-1])
        if last_series != axial.series_uid:
            wrong.append(
                f"{label}: the last report names {_series_name(sent, last_series or '')}, not the 5 mm series"
            )
        positions = _report_position_range(reports[-1])
        if sent.bleed and positions is not None and positions[0] > positions[1]:
            wrong.append(f"{label}: the report's slice positions run downwards {positions}")
    return wrong


def _slice_range_problems(sent: Sent, finding: dict[str, Any]) -> list[str]:
    """A positive finding's slice range: lowest position first, on the 5 mm series' slices,
    its instance numbers those of the slices at those positions (whichever way they count)."""
    r = finding.get("slice_range")
    if not finding["positive"] or r is None:
        return [f"{sent.label}: a positive ICH finding without a slice range"] if finding["positive"] else []
    axial = sent.manifest.of("axial")
    assert axial.z_range_mm is not None
    out = []
    first, last = float(r["first_position_mm"]), float(r["last_position_mm"])
    if first > last:
        out.append(f"{sent.label}: slice range runs downwards ({first} > {last})")
    lo, hi = axial.z_range_mm
    if not (lo - 0.01 <= first <= hi + 0.01 and lo - 0.01 <= last <= hi + 0.01):
        out.append(f"{sent.label}: slice range z {first}..{last} is not on the 5 mm series ({lo}..{hi})")
    if axial.series_uid == finding["series_uid"] and r.get("first_instance_number") is not None:
        # InstanceNumber -> z of the 5 mm series (the manifest lists its files in number order).
        step = axial.slice_thickness_mm or 0.0
        z_of = {
            n: (lo + (n - 1) * step if sent.manifest.instance_order == "ascending" else hi - (n - 1) * step)
            for n in range(1, len(axial.files) + 1)
        }
        for end, pos in (("first", first), ("last", last)):
            n = int(r[f"{end}_instance_number"])
            if n not in z_of or abs(z_of[n] - pos) > 0.01:
                out.append(f"{sent.label}: {end} instance {n} is not the slice at z {pos}")
    return out


@pytest.mark.parametrize("scenario", list(SENDS))
def test_a_realistic_study_gets_one_decision_on_its_5mm_series(
    stack: Stack, tmp_path: Path, scenario: str
) -> None:
    seed = 1600 + 10 * list(SENDS).index(scenario)
    studies = [
        _write(
            tmp_path,
            f"{scenario}/{'bleed' if bleed else 'normal'}",
            bleed,
            seed + i,
            **VARIANTS[scenario][bleed],
        )
        for i, bleed in enumerate((True, False))
    ]
    out = AllOutputs(stack.bootstrap)
    for sent in studies:
        for kinds in SENDS[scenario]:
            sent.sends.append((kinds, *_storescu_send(stack, sent.manifest.files(kinds))))

    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    while time.monotonic() < deadline and not all(_settled(s, out) for s in studies):
        out.drain(1.0)
    out.drain(GRACE_S)

    seen = "\n".join(_describe(s, out) for s in studies)
    problems = [p for s in studies for p in _problems(s, out)]
    assert not problems, "\n".join(["", *problems, "", "what came out:", seen])


@pytest.fixture
def orthanc(stack: Stack, tmp_path: Path) -> Iterator[Orthanc]:
    """A real Orthanc with radtriage as a DICOM modality: the PACS that forwards to it."""
    pacs = Orthanc(
        tmp_path / "orthanc", modalities={"radtriage": ("RADTRIAGE", "127.0.0.1", stack.dicom_port)}
    )
    pacs.start()
    yield pacs
    pacs.stop()


@pytest.mark.parametrize(
    ("bleed", "syntax"), [(True, "jpeg-ls"), (False, "jpeg-lossless")], ids=["bleed-jpegls", "normal-jpeg"]
)
def test_a_compressed_study_a_pacs_forwards_gets_one_decision_on_its_5mm_series(
    stack: Stack, orthanc: Orthanc, tmp_path: Path, bleed: bool, syntax: TransferSyntax
) -> None:
    """What a PACS does: the finished study, compressed as it was archived, forwarded by
    Orthanc's own C-STORE SCU in one association (its choice of contexts and order, not
    storescu's)."""
    label = f"orthanc-forward/{'bleed' if bleed else 'normal'}/{syntax}"
    order = "descending" if bleed else "ascending"
    sent = _write(
        tmp_path, label, bleed, 1700 + int(bleed), "OF", transfer_syntax=syntax, instance_order=order
    )
    manifest = sent.manifest
    orthanc.upload(manifest.files())
    assert orthanc.instance_count() == len(manifest.files())
    out = AllOutputs(stack.bootstrap)
    try:
        answer = orthanc.forward("radtriage", sent.uid)
        failed = int(answer.get("FailedInstancesCount", 0))
        sent.sends.append((["dose_sr", "scout", "axial", "thin", "bone"], failed, json.dumps(answer)[:300]))
    except urllib.error.HTTPError as exc:  # Orthanc says why in its body
        sent.sends.append(
            (
                ["dose_sr", "scout", "axial", "thin", "bone"],
                exc.code,
                exc.read().decode(errors="replace")[-300:],
            )
        )
    assert sent.sends[0][1] == 0, f"Orthanc could not forward the study: {sent.sends[0][2]}"
    assert int(answer["InstancesCount"]) == len(manifest.files())

    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    while time.monotonic() < deadline and not _settled(sent, out):
        out.drain(1.0)
    out.drain(GRACE_S)
    problems = _problems(sent, out)
    # As archived, not transcoded on the way: Orthanc falls back to uncompressed when a
    # peer refuses the compressed syntax, which would hide a refusal here.
    images = [d for d in out.of("imaging.instances", sent.uid) if d["kind"] == "instance" and d["has_pixels"]]
    syntaxes = {d["transfer_syntax_uid"] for d in images}
    if syntaxes != {COMPRESSED_UIDS[syntax]}:
        problems.append(f"the images arrived in {sorted(syntaxes)}, not {COMPRESSED_UIDS[syntax]} ({syntax})")
    assert not problems, "\n".join(["", *problems, "", "what came out:", _describe(sent, out)])
