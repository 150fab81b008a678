"""Issue 7 on the DICOM ports, against a real Kafka: the caller allow-list and TLS.

Peers: dcmtk's `storescu` (Debian's build has no TLS: `storescu --help` lists no +tls
options) and pynetdicom's AE, which is also the TLS peer (`tls_args`) and the one that
connects from 127.0.0.2 (`bind_address`; any 127/8 address is local on Linux). Every
test has its own `imaging.instances` topic: "nothing rejected reached Kafka" is checked
over the whole topic, after the allowed sends that follow the rejected ones.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydicom import dcmread
from pynetdicom import AE

from connectors.dicom.callers import REASONS
from connectors.dicom.listener import start_scp
from radtriage.settings import DicomSettings, Settings
from radtriage.tls import TlsConfigError
from tests.certs import Pki, make_pki
from tests.integration.test_dicom_scp import _scu, _series
from tests.support.dicom import storescu
from tests.support.kafka import PARTITIONS, read_topic
from tests.support.net import free_port
from tests.support.settings import isolated_settings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
]

REJECTED_OUTPUT = "Association Rejected"


def _refusals() -> dict[str, float]:
    counts = {
        r: REGISTRY.get_sample_value("radtriage_dicom_association_refusals_total", {"reason": r}) or 0.0
        for r in REASONS
    }
    counts["rejected"] = (
        REGISTRY.get_sample_value("radtriage_dicom_associations_total", {"result": "rejected"}) or 0.0
    )
    return counts


def _delta(before: dict[str, float], expect: dict[str, float] | None = None) -> dict[str, float]:
    """What the refusal counters added since `before`; with `expect`, waited for (up to 30 s)
    first: a failed handshake is counted on its connection's thread."""
    deadline = time.monotonic() + 30
    while True:
        delta = {k: v - before[k] for k, v in _refusals().items() if v != before[k]}
        if expect is None or delta == expect or time.monotonic() > deadline:
            return delta
        time.sleep(0.1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _settings(tmp_path: Path, bootstrap: str, **dicom: Any) -> Settings:
    settings = isolated_settings(tmp_path / "home", bootstrap, ("instances",), partitions=PARTITIONS)
    # Validated like a YAML file's section: allow-list entries and TLS checks apply.
    settings.dicom = DicomSettings.model_validate(
        {"port": free_port(), "tls_port": free_port(), "bind_address": "127.0.0.1", **dicom}
    )
    return settings


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """Stop functions of the listeners a test starts, called at its end."""
    stops: list[Any] = []
    try:
        yield stops
    finally:
        for stop in stops:
            stop()


def _sop_uids(files: list[Path]) -> set[str]:
    return {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def _stored(settings: Settings, want: int) -> tuple[set[str], int]:
    """SOP Instance UIDs on the topic, and the number of transfer-complete markers."""
    records = read_topic(settings.kafka.bootstrap_servers, settings.topics.instances, want)
    instances = {r.value["sop_instance_uid"] for r in records if r.value["kind"] == "instance"}
    return instances, sum(r.value["kind"] == "transfer_complete" for r in records)


def _associate(ae: AE, settings: Settings, port: int, *, called: str = "", **kw: Any) -> Any:
    return ae.associate("127.0.0.1", port, ae_title=called or settings.dicom.ae_title, **kw)


def _rejection(assoc: Any) -> tuple[int, int, int]:
    assert assoc.is_rejected and not assoc.is_established
    rj = assoc.acceptor.primitive
    return (rj.result, rj.result_source, rj.diagnostic)


def _store_all(assoc: Any, files: list[Path]) -> None:
    assert assoc.is_established
    try:
        assert [int(assoc.send_c_store(dcmread(f)).Status) for f in files] == [0] * len(files)
    finally:
        assoc.release()


def test_caller_allow_list(
    kafka_bootstrap: str, tmp_path: Path, started: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(
        tmp_path,
        kafka_bootstrap,
        allowed_callers=[
            {"ae_title": "CT_ED_1", "hosts": ["127.0.0.1/32", "10.1.2.0/24"]},
            {"ae_title": "MR_1", "hosts": ["127.0.0.2"]},
        ],
    )
    port = settings.dicom.port
    _servers, stop = start_scp(settings)
    started.append(stop)
    caplog.set_level(logging.WARNING, logger="connectors.dicom")
    before = _refusals()
    shape = (3, 32, 32)
    rejected_files = [_series(tmp_path / f"rejected{i}", 100 + i, shape=shape) for i in range(3)]

    # storescu with an AE title nobody listed; with MR_1 from 127.0.0.1 (MR_1 may call from
    # 127.0.0.2 only); with CT_ED_1 to storescu's default called AE title.
    for args, files, reason in [
        (["-aet", "UNKNOWN_AE", "-aec", "RADTRIAGE"], rejected_files[0], "Calling AE Title Not Recognized"),
        (["-aet", "MR_1", "-aec", "RADTRIAGE"], rejected_files[1], "Calling AE Title Not Recognized"),
        (["-aet", "CT_ED_1"], rejected_files[2], "Called AE Title Not Recognized"),
    ]:
        out = storescu("-v", *args, "127.0.0.1", str(port), *map(str, files))
        text = out.stdout + out.stderr
        assert out.returncode != 0 and REJECTED_OUTPUT in text, text
        assert "Rejected Permanent, Source: Service User" in text and reason in text, text
    # pynetdicom from 127.0.0.2 as CT_ED_1 (allowed from 127.0.0.1 and 10.1.2.0/24 only).
    assoc = _associate(_scu("CT_ED_1"), settings, port, bind_address=("127.0.0.2", 0))
    assert _rejection(assoc) == (0x01, 0x01, 0x03)

    # The allowed ones: storescu as CT_ED_1 from 127.0.0.1, pynetdicom as MR_1 from 127.0.0.2.
    ct = _series(tmp_path / "ct", 1, shape=shape)
    mr = _series(tmp_path / "mr", 2, shape=shape)
    out = storescu("-v", "-aet", "CT_ED_1", "-aec", "RADTRIAGE", "127.0.0.1", str(port), *map(str, ct))
    assert out.returncode == 0, out.stdout + out.stderr
    _store_all(_associate(_scu("MR_1"), settings, port, bind_address=("127.0.0.2", 0)), mr)

    instances, markers = _stored(settings, len(ct) + len(mr) + 2)
    assert instances == _sop_uids(ct) | _sop_uids(mr) and markers == 2
    assert len(list(settings.blob_dir.rglob("*.dcm"))) == len(ct) + len(mr)
    assert _delta(before) == {
        "calling_ae_unknown": 1,
        "address_not_allowed": 2,
        "called_ae_mismatch": 1,
        "rejected": 4,
    }
    refusals = [r.getMessage() for r in caplog.records if "rejected (" in r.getMessage()]
    assert refusals == [
        "DICOM association from UNKNOWN_AE at 127.0.0.1 to RADTRIAGE rejected (calling_ae_unknown): "
        "calling AE title not in dicom.allowed_callers",
        "DICOM association from MR_1 at 127.0.0.1 to RADTRIAGE rejected (address_not_allowed): "
        "source address not in the hosts dicom.allowed_callers lists for this AE title",
        "DICOM association from CT_ED_1 at 127.0.0.1 to ANY-SCP rejected (called_ae_mismatch): "
        "called AE title is not RADTRIAGE",
        "DICOM association from CT_ED_1 at 127.0.0.2 to RADTRIAGE rejected (address_not_allowed): "
        "source address not in the hosts dicom.allowed_callers lists for this AE title",
    ]


def _tls_scu(pki: Pki, title: str, cert: bool = False) -> tuple[AE, tuple[ssl.SSLContext, str]]:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return _scu(title), (context, "127.0.0.1")


def test_tls_listener_beside_the_plain_one(
    kafka_bootstrap: str, tmp_path: Path, pki: Pki, started: list[Any]
) -> None:
    settings = _settings(
        tmp_path,
        kafka_bootstrap,
        allowed_callers=[{"ae_title": "CT_ED_1", "hosts": ["127.0.0.1"]}],
        tls={"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
    )
    tls_port = settings.dicom.tls_port
    servers, stop = start_scp(settings)
    started.append(stop)
    assert [s.server_address[1] for s in servers] == [settings.dicom.port, tls_port]
    before = _refusals()
    shape = (3, 32, 32)
    over_tls, over_plain, refused = (
        _series(tmp_path / n, i, shape=shape) for i, n in enumerate(["t", "p", "r"], 40)
    )

    # A peer that opens a TCP connection to the TLS port and says nothing. pynetdicom's own
    # server would sit in its handshake on the accepting thread, and nobody else could
    # connect; ours handshakes on the connection's thread.
    with socket.create_connection(("127.0.0.1", tls_port)):
        ae, tls_args = _tls_scu(pki, "CT_ED_1")
        ae.acse_timeout = ae.network_timeout = 30
        assoc = _associate(ae, settings, tls_port, tls_args=tls_args)
        assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
        _store_all(assoc, over_tls)
        # The allow-list holds on the TLS port too.
        ae, tls_args = _tls_scu(pki, "UNKNOWN_AE")
        assert _rejection(_associate(ae, settings, tls_port, tls_args=tls_args)) == (0x01, 0x01, 0x03)
        # storescu (plain DICOM) to the TLS port: the handshake fails, nothing is accepted.
        out = storescu(
            "-v", "-aet", "CT_ED_1", "-aec", "RADTRIAGE", "127.0.0.1", str(tls_port), *map(str, refused)
        )
        assert out.returncode != 0, out.stdout
        assert "Store SCU RQ" not in out.stdout + out.stderr
        # The plain listener serves as before.
        out = storescu(
            "-v",
            "-aet",
            "CT_ED_1",
            "-aec",
            "RADTRIAGE",
            "127.0.0.1",
            str(settings.dicom.port),
            *map(str, over_plain),
        )
        assert out.returncode == 0, out.stdout + out.stderr

    instances, markers = _stored(settings, len(over_tls) + len(over_plain) + 2)
    assert instances == _sop_uids(over_tls) | _sop_uids(over_plain) and markers == 2
    # Handshakes failed: storescu's plain A-ASSOCIATE-RQ and, once it hung up, the silent peer.
    expect = {"calling_ae_unknown": 1.0, "rejected": 1.0, "tls_handshake_failed": 2.0}
    assert _delta(before, expect) == expect


def test_mutual_tls_only(kafka_bootstrap: str, tmp_path: Path, pki: Pki, started: list[Any]) -> None:
    settings = _settings(
        tmp_path,
        kafka_bootstrap,
        plain_enabled=False,
        tls={
            "enabled": True,
            "cert_file": str(pki.server_cert),
            "key_file": str(pki.server_key),
            "client_ca_file": str(pki.ca),
        },
    )
    servers, stop = start_scp(settings)
    started.append(stop)
    assert [s.server_address[1] for s in servers] == [settings.dicom.tls_port]
    before = _refusals()
    # No plain listener at all.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", settings.dicom.port)) != 0
    files = _series(tmp_path / "s", 50, shape=(2, 32, 32))
    # Without a client certificate: no association.
    ae, tls_args = _tls_scu(pki, "ANY_SCU")
    ae.acse_timeout = ae.network_timeout = 30
    assoc = _associate(ae, settings, settings.dicom.tls_port, tls_args=tls_args)
    assert not assoc.is_established
    # With one the client CA signed: stored.
    ae, tls_args = _tls_scu(pki, "ANY_SCU", cert=True)
    _store_all(_associate(ae, settings, settings.dicom.tls_port, tls_args=tls_args), files)
    instances, markers = _stored(settings, len(files) + 1)
    assert instances == _sop_uids(files) and markers == 1
    assert _delta(before, {"tls_handshake_failed": 1}) == {"tls_handshake_failed": 1}


def test_unusable_tls_settings_stop_the_start(kafka_bootstrap: str, tmp_path: Path, pki: Pki) -> None:
    settings = _settings(
        tmp_path,
        kafka_bootstrap,
        tls={"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.other_client_key)},
    )
    with pytest.raises(TlsConfigError, match=r"dicom\.tls: cannot use certificate"):
        start_scp(settings)
    # Nothing was left listening.
    for port in (settings.dicom.port, settings.dicom.tls_port):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
