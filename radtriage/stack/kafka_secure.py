"""A local Kafka cluster with the production security model: SASL_SSL, SCRAM-SHA-512, ACLs.

Listeners of each node:
- CLIENT (SASL_SSL, SCRAM-SHA-512): every client, and the brokers among themselves
  (inter.broker.listener.name=CLIENT, as the admin super user), so replication is
  authenticated and encrypted exactly like client traffic.
- CONTROLLER (SSL, client certificate required): KRaft's quorum and the brokers'
  controller channel. Not SCRAM: SCRAM credentials live in the metadata log the
  controllers serve, so they cannot authenticate the quorum that serves it (KIP-900
  supports SCRAM on broker listeners only); mutual TLS with the broker certificate
  (a super user) keeps the port closed to anyone without a CA-signed certificate.
SCRAM users (admin + one per role, radtriage.kafka_acls.ROLE_USERS) are written at storage
format time (`StorageTool format --add-scram`, KIP-900) with random passwords kept in
0600 files beside the data; the ACLs of radtriage.kafka_acls are applied once it runs.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Final

from radtriage.kafka_acls import ROLE_USERS, apply_acls
from radtriage.kafka_clients import kafka_python_kwargs
from radtriage.settings import KafkaSettings, Settings
from radtriage.stack.kafka import LocalKafkaCluster, cluster_client_settings
from radtriage.stack.kafka_tls import TlsFiles, make_tls_files

MECHANISM: Final = "SCRAM-SHA-512"


class SecureLocalKafkaCluster(LocalKafkaCluster):
    def __init__(self, *, data_dir: Path, **kwargs: Any) -> None:
        self.tls: TlsFiles = make_tls_files(data_dir / "tls")
        self.credentials_dir = data_dir / "credentials"
        self._passwords = self._load_or_make_passwords()
        super().__init__(data_dir=data_dir, **kwargs)

    def _load_or_make_passwords(self) -> dict[str, str]:
        self.credentials_dir.mkdir(parents=True, exist_ok=True)
        self.credentials_dir.chmod(0o700)
        passwords = {}
        for user in ROLE_USERS.values():
            path = self.credentials_dir / user
            if not path.exists():
                path.write_text(secrets.token_urlsafe(24) + "\n")
                path.chmod(0o600)
            passwords[user] = path.read_text().strip()
        return passwords

    def password_file(self, role: str) -> Path:
        return self.credentials_dir / ROLE_USERS[role]

    def _node_options(self, index: int, port: int, controller_port: int) -> dict[str, Any]:
        host = self.host
        admin_pw = self._passwords["admin"]
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="admin" password="{admin_pw}";'
        )
        return {
            "listeners": [
                f"listeners=CLIENT://{host}:{port},CONTROLLER://{host}:{controller_port}",
                f"advertised.listeners=CLIENT://{host}:{port}",
                "inter.broker.listener.name=CLIENT",
                "listener.security.protocol.map=CLIENT:SASL_SSL,CONTROLLER:SSL",
            ],
            "extra_properties": [
                f"sasl.enabled.mechanisms={MECHANISM}",
                f"sasl.mechanism.inter.broker.protocol={MECHANISM}",
                f"listener.name.client.{MECHANISM.lower()}.sasl.jaas.config={jaas}",
                "ssl.keystore.type=PEM",
                f"ssl.keystore.location={self.tls.broker_keystore}",
                "ssl.truststore.type=PEM",
                f"ssl.truststore.location={self.tls.ca_cert}",
                "listener.name.controller.ssl.client.auth=required",
                "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                f"super.users=User:admin;{self.tls.broker_principal}",
                "allow.everyone.if.no.acl.found=false",
            ],
            "format_args": [
                arg
                for user, pw in self._passwords.items()
                for arg in ("--add-scram", f"{MECHANISM}=[name={user},password={pw}]")
            ],
            "ready_kwargs": kafka_python_kwargs(self._role_settings("admin", port)),
        }

    def _role_settings(self, role: str, port: int | None = None) -> KafkaSettings:
        return KafkaSettings(
            bootstrap_servers=f"{self.host}:{port}" if port is not None else "",
            security_protocol="SASL_SSL",
            sasl_mechanism=MECHANISM,
            sasl_username=ROLE_USERS[role],
            sasl_password_file=self.password_file(role),
            ssl_cafile=self.tls.ca_cert,
        )

    def client_settings(self, role: str, base: KafkaSettings | None = None) -> KafkaSettings:
        """Connection settings of `role` (its SCRAM user, the cluster CA) on this cluster."""
        secure = self._role_settings(role)
        return cluster_client_settings(self, base).model_copy(
            update={
                k: getattr(secure, k)
                for k in (
                    "security_protocol",
                    "sasl_mechanism",
                    "sasl_username",
                    "sasl_password_file",
                    "ssl_cafile",
                )
            }
        )

    def start(self, timeout: float = 120.0, settings: Settings | None = None) -> None:
        super().start(timeout)
        try:
            apply_acls(self.client_settings("admin"), settings or Settings())
        except BaseException:
            self.stop()
            raise
