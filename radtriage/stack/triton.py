"""A local Triton Inference Server: the real `tritonserver` shipped in the nvidia-pytriton wheel.

The wheel carries the server, its shared libraries and a Python-backend stub per
Python version. Like PyTriton itself, we lay out a backend directory with the stub
for this interpreter (once, in the cache, never in the repo) and start the server
with the library path it needs. Two pitfalls found on these machines are handled
here: the stub must load this interpreter's libpython (else model load fails with
"'_thread.RLock' object has no attribute '_recursion_count'"), and model.py must see
this venv's site-packages to import torch.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import site
import sys
import sysconfig
import urllib.request
from pathlib import Path

from models import backend
from radtriage.settings import REPO_ROOT, Settings
from radtriage.stack.process import LocalService, ServiceError, ServiceProcess, port_in_use


def pytriton_dist() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def prepare_server_dir(cache_root: Path) -> Path:
    """Copy the server and the matching stub into the cache (idempotent, safe in parallel)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    import pytriton

    target = cache_root / f"tritonserver-pytriton{getattr(pytriton, '__version__', 'x')}-py{version}"
    marker = target / ".complete"
    if marker.exists():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    with (cache_root / ".triton.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        dist = pytriton_dist()
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise ServiceError(f"nvidia-pytriton has no Python-backend stub for Python {version}")
        shutil.copytree(dist, target, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        shutil.copy2(stub, target / "backends" / "python" / "triton_python_backend_stub")
        marker.write_text("ok\n")
    return target


def server_env(extra_pythonpath: list[Path]) -> dict[str, str]:
    import pytriton

    env = dict(os.environ)
    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(libs), libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    paths = [str(p) for p in extra_pythonpath] + site.getsitepackages()
    env["PYTHONPATH"] = ":".join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


RESTRICTED_APIS = "metadata,inference,shared-memory,model-config,model-repository,statistics,trace,logging"


class LocalTriton(LocalService):
    def __init__(
        self,
        model_repository: Path,
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        log_file: Path,
        extra_pythonpath: list[Path] | None = None,
        cache_root: Path | None = None,
        host: str = "127.0.0.1",
        restricted: dict[str, str] | None = None,
    ) -> None:
        """`restricted`: {header: value} that every API but health must carry (TritonSettings.api_key)."""
        self.model_repository = model_repository
        self.restricted = restricted or {}
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.host = host
        self.log_file = log_file
        self.extra_pythonpath = extra_pythonpath or []
        self.cache_root = cache_root or Path(
            os.environ.get("RADTRIAGE_CACHE", Path.home() / ".cache" / "radtriage")
        )
        self._service: ServiceProcess | None = None

    @classmethod
    def for_settings(cls, settings: Settings, log_file: Path) -> LocalTriton:
        """The server `settings.triton` describes (its ports, repository and API key), with the
        checkout's packages importable by the Python backend: what `radtriage up` and the
        benches start."""
        return cls(
            settings.triton.model_repository,
            http_port=int(settings.triton.http_url.rsplit(":", 1)[1]),
            grpc_port=int(settings.triton.grpc_url.rsplit(":", 1)[1]),
            metrics_port=settings.triton.metrics_port,
            log_file=log_file,
            extra_pythonpath=[REPO_ROOT],
            restricted=settings.triton.auth_headers(),
        )

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def _ready(self) -> bool:
        url = f"http://{self.host}:{self.http_port}/v2/health/ready"
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)

    def start(self, timeout: float = 180.0) -> None:
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            if port_in_use(port, self.host):
                raise ServiceError(f"Triton: port {port} is already in use (another Triton running?)")
        server = prepare_server_dir(self.cache_root)
        # Each version directory's model.py is generated from the one source (not committed).
        backend.install_all(self.model_repository)
        argv = [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={server / 'backends'}",
            f"--cache-directory={server / 'caches'}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--log-verbose=0",
        ]
        for header, value in self.restricted.items():
            # Health stays open: liveness/readiness probes carry no key and reveal nothing.
            argv.append(f"--grpc-restricted-protocol={RESTRICTED_APIS}:{header}={value}")
            argv.append(f"--http-restricted-api={RESTRICTED_APIS}:{header}={value}")
        self._service = ServiceProcess(
            "tritonserver", argv, self.log_file, env=server_env(self.extra_pythonpath)
        )
        self._service.start()
        self._service.wait_until(self._ready, timeout, "the server and its models to be ready")

    def stop(self) -> None:
        if self._service is not None:
            self._service.stop()
            self._service = None
