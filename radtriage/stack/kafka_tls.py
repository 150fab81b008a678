"""Throw-away TLS material for a local secure Kafka cluster, made with the openssl CLI.

A CA, and one broker certificate for 127.0.0.1 / localhost (SANs) signed by it, as PEM.
The broker keystore is one PEM file holding the unencrypted PKCS#8 key and the certificate
chain (ssl.keystore.type=PEM; Kafka >= 3.2 accepts an unencrypted key in a file when
ssl.key.password is not set, KAFKA-12703). The same certificate is the brokers' client
certificate on the mutual-TLS controller listener. For tests and `radtriage up` only:
production certificates come from the operator (Strimzi's cluster CA) or your PKI.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from radtriage.stack.process import ServiceError

BROKER_CN = "radtriage-kafka-broker"


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    broker_keystore: Path  # key + certificate chain, PEM

    @property
    def broker_principal(self) -> str:
        # Kafka's default SSL principal is the certificate's distinguished name.
        return f"User:CN={BROKER_CN}"


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise ServiceError(f"openssl {args[0]} failed: {result.stderr[-1000:]}")


def make_tls_files(directory: Path, days: int = 30) -> TlsFiles:
    """Create (once) a CA and a broker certificate for 127.0.0.1/localhost in `directory`."""
    files = TlsFiles(directory / "ca.pem", directory / "broker-keystore.pem")
    if files.ca_cert.exists() and files.broker_keystore.exists():
        return files
    if shutil.which("openssl") is None:
        raise ServiceError("the secure local cluster needs the openssl command: apt-get install openssl")
    directory.mkdir(parents=True, exist_ok=True)
    names = ("ca-key.pem", "broker-key.pem", "broker.csr", "broker.pem")
    ca_key, key, csr, cert = (directory / n for n in names)
    ext = directory / "broker.ext"
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(ca_key))
    _openssl(
        "req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", str(days),
        "-subj", "/CN=radtriage local Kafka CA", "-out", str(files.ca_cert),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    # genpkey writes PKCS#8 ("BEGIN PRIVATE KEY"), unencrypted: what Kafka's PEM keystore reads.
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={BROKER_CN}", "-out", str(csr))
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(files.ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", str(days), "-sha256", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    files.broker_keystore.write_text(key.read_text() + cert.read_text() + files.ca_cert.read_text())
    for path in (ca_key, key, files.broker_keystore):
        path.chmod(0o600)
    return files
