"""nginx (Debian's nginx-light, scripts/install.sh --test) as a peer that wants a client
certificate: it terminates TLS on a port of its own with `ssl_verify_client on` and passes
the requests to a plain-HTTP server behind it (the tests' HAPI FHIR server). What the
client is told when its certificate is missing or signed by another CA is nginx's own
answer (HTTP 400, "No required SSL certificate was sent" / "The SSL certificate error").
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from radtriage.stack.process import terminate_with_parent
from tests.support.net import free_port
from tests.support.process import PeerProcess
from tests.support.wait import wait_until


class MutualTlsProxy(PeerProcess):
    """`https://127.0.0.1:<port>/` -> `upstream`, for clients whose certificate `client_ca` signed."""

    def __init__(self, work: Path, upstream: str, cert: Path, key: Path, client_ca: Path) -> None:
        self.work, self.port = work, free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # One process, in the foreground, everything under `work` (not /var): no root needed.
        self.config = f"""
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    client_max_body_size 16m;
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {client_ca};
        ssl_verify_client on;
        location / {{
            proxy_pass {upstream.rstrip("/")};
            proxy_set_header Host $http_host;
        }}
    }}
}}
"""

    def url(self, path: str = "/") -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    @property
    def error_log(self) -> str:
        log = self.work / "error.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def start(self) -> None:
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        assert Path(exe).exists(), "nginx is needed as the mutual-TLS peer (scripts/install.sh --test)"
        self.work.mkdir(parents=True, exist_ok=True)
        conf = self.work / "nginx.conf"
        conf.write_text(self.config)
        self.proc = subprocess.Popen(
            [exe, "-p", str(self.work), "-c", str(conf), "-e", str(self.work / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=terminate_with_parent(),
        )
        wait_until(lambda: self._listening() or self.proc is None or self.proc.poll() is not None,
                   "nginx listening", timeout=30)  # fmt: skip
        assert self.proc.poll() is None, f"nginx did not start:\n{self.error_log[-3000:]}"
