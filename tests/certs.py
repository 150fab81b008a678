"""Test certificates, made by the `openssl` CLI into a test's tmp_path (never in the repo)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(dir: Path, name: str) -> tuple[Path, Path]:
    key, cert = dir / f"{name}.key", dir / f"{name}.pem"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key), cwd=dir)
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", "2",
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=dir,
    )  # fmt: skip
    return cert, key


def _leaf(dir: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, csr, cert, extfile = (dir / f"{name}{s}" for s in (".key", ".csr", ".pem", ".ext"))
    extfile.write_text(ext + "\nbasicConstraints=critical,CA:FALSE\n")
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key), cwd=dir)
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=dir)
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(extfile),
        cwd=dir,
    )  # fmt: skip
    return cert, key


@dataclass(frozen=True)
class Certs:
    ca: Path  # issued the server certificate: what a client trusts
    server_cert: Path
    server_key: Path
    client_ca: Path  # the server's http.tls.client_ca_file
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def make_certs(dir: Path) -> Certs:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make test certificates")
    dir.mkdir(parents=True, exist_ok=True)
    ca = _ca(dir, "test-server-ca")
    server = _leaf(
        dir, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
    )
    client_ca = _ca(dir, "test-client-ca")
    client = _leaf(dir, "client", client_ca, "extendedKeyUsage=clientAuth")
    rogue_ca = _ca(dir, "rogue-ca")
    rogue = _leaf(dir, "rogue", rogue_ca, "extendedKeyUsage=clientAuth")
    return Certs(ca[0], *server, client_ca[0], *client, *rogue)
