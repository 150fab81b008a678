"""One study, one decision, through a real worker, Kafka and Triton (issue 16): a head CT
arriving one series per association — a thin recon first, then the 5 mm series the ICH
rule prefers, then a bone-kernel series — is read on the thin series, read again (and the
report amended, same id) when the 5 mm series arrives, and not read at all for the bone
series; the bleed is alerted once."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer

from models.dicom_writer import write_ct_series
from models.phantoms import head_ct_phantom
from radtriage.settings import Settings
from tests.integration.harness import Worker
from tests.support.kafka import Tail
from tests.support.series import BONE, THICK, THIN, send_series

pytestmark = pytest.mark.integration


def test_a_later_preferred_series_amends_and_a_worse_one_changes_nothing(
    worker_env: tuple[dict[str, str], Settings], triton_grpc_url: str, tmp_path: Path
) -> None:
    env, settings = worker_env
    env["RADTRIAGE_TRITON__GRPC_URL"] = triton_grpc_url
    env["RADTRIAGE_TRITON__TIMEOUT_S"] = "30"
    t = settings.topics
    study = f"1.2.826.0.9.{time.time_ns()}"
    phantom = head_ct_phantom(np.random.default_rng(7007), bleed=True, min_bleed_ml=5.0)
    dz, dy, dx = phantom.spacing_zyx
    # The same head reconstructed thin: every slice twice, at half the thickness.
    thin_hu = np.repeat(phantom.hu, 2, axis=0)
    kw = {"study_uid": study, "body_part": "HEAD"}
    thin = write_ct_series(thin_hu, (dz / 2, dy, dx), tmp_path / "thin", series_uid=study + ".3", **kw)
    thick = write_ct_series(
        phantom.hu, phantom.spacing_zyx, tmp_path / "thick", series_uid=study + ".2", **kw
    )
    bone = write_ct_series(phantom.hu, phantom.spacing_zyx, tmp_path / "bone", series_uid=study + ".4", **kw)

    worker = Worker(env, settings.home)
    worker.start()
    tail = Tail(
        settings.kafka.bootstrap_servers,
        [t.findings, t.results_fhir, t.alert_topic("ich"), t.audit, t.deadletter],
    )
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")

    send_series(producer, settings, thin, study, THIN, dz / 2)
    tail.until(lambda: len(tail.of(t.results_fhir, study_uid=study)) == 1, timeout=120)
    send_series(producer, settings, thick, study, THICK, dz)
    tail.until(lambda: len(tail.of(t.results_fhir, study_uid=study)) == 2, timeout=120)
    send_series(producer, settings, bone, study, BONE, dz)
    tail.until(
        lambda: any(a["decision"] == "series_unchanged" for a in tail.of(t.audit, study_uid=study)),
        timeout=60,
    )
    tail.drain(5.0)
    worker.kill(signal.SIGTERM)

    assert not tail.of(t.deadletter, study_uid=study)
    first, second = tail.of(t.findings, study_uid=study)
    assert (first["series_uid"], first["series_number"]) == (study + ".3", 3)
    assert (second["series_uid"], second["series_number"], second["series_description"]) == (
        study + ".2",
        2,
        "Head 5.0 H30s",
    )
    assert second["positive"]
    assert second["amends_request_id"] == first["request_id"] and not first["amends_request_id"]
    reports = [r["bundle"]["entry"][0]["resource"] for r in tail.of(t.results_fhir, study_uid=study)]
    assert [r["status"] for r in reports] == ["preliminary", "amended"]
    assert reports[0]["id"] == reports[1]["id"]
    assert 'series 2 "Head 5.0 H30s"' in reports[1]["conclusion"]
    assert len(tail.of(t.alert_topic("ich"), study_uid=study)) == 1
    decisions = [a["decision"] for a in tail.of(t.audit, study_uid=study)]
    assert decisions.count("reread_better_series") == 1 and decisions.count("routed") == 1
    # The first read may or may not call the bleed; either way one alert, never two.
    assert decisions.count("alert_sent") == 1
    assert decisions.count("alert_suppressed_duplicate") == int(first["positive"])
