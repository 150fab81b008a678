"""radtriage installed from its wheel, not a checkout (issue 17, "Default paths depend on a
checkout"): the wheel carries the data deploy/ holds for the running product (setup.py),
and `Settings()`'s defaults, under `data_dir`, point at those files in the installed
package: the routing rules load, the model repository has every model's config.pbtxt,
the Kafka POM and the Python backend's source are there.

The wheel is built once per session (`pip wheel --no-build-isolation`: the venv's
setuptools, no network) from a copy of the working tree (no build/ left in the clone) and
installed with --no-deps into a throwaway venv that borrows this venv's dependencies
(a .pth naming its site-packages, after the venv's own: the installed radtriage wins, and
the editable install's path hook of this venv is not followed). ~20 s; no Kafka or Triton."""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from models import registry
from radtriage.settings import REPO_ROOT

pytestmark = pytest.mark.integration

# What the copied tree needs to build (not .git, build output, caches, bench results).
IGNORED = shutil.ignore_patterns(
    ".git", "build", "*.egg-info", "__pycache__", ".*_cache", "results", "tests", "docs", "k8s"
)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("src") / "radtriage"
    shutil.copytree(REPO_ROOT, tree, ignore=IGNORED)
    # Generated per version directory by the Triton launcher; not part of the source.
    for generated in tree.glob("deploy/triton/model_repository/*/[0-9]*/model.py"):
        generated.unlink()
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(tree),
            "-w",
            str(out),
            "--no-deps",
            "--no-build-isolation",
            "-q",
        ],
        check=True,
        timeout=600,
    )
    (built,) = out.glob("radtriage-*.whl")
    return built


@pytest.fixture(scope="session")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a throwaway venv with the wheel installed (not editable)."""
    venv = tmp_path_factory.mktemp("venv") / "x"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300
    )
    python = venv / "bin" / "python"
    own = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # This venv's dependencies (pydantic, pydicom, …), after the throwaway's own site-packages.
    (Path(own) / "borrowed-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300)
    return python


def test_the_wheel_carries_the_data_the_product_reads(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    data = "radtriage/deploy/"
    assert f"{data}routing/rules.yaml" in names
    assert f"{data}kafka/pom.xml" in names
    assert f"{data}triton/python_backend/model.py" in names
    for name in registry.specs():
        if not (REPO_ROOT / "deploy" / "triton" / "model_repository" / name).is_dir():
            continue  # a model a test or deployment added (RADTRIAGE_MODEL_SPECS), not shipped
        assert f"{data}triton/model_repository/{name}/config.pbtxt" in names
        assert f"{data}triton/model_repository/{name}/1/model.pt" in names
    # Not what radtriage runs on (a deployment's manifests, dashboards), nor generated files.
    assert not any(n.startswith((f"{data}k8s/", f"{data}observability/")) for n in names)
    assert not any(n.endswith("/1/model.py") for n in names)


CHECK = """
import json
from pathlib import Path
import radtriage
from models import backend
from radtriage.settings import Settings
from schemas.routing_rules import RoutingRules

s = Settings()
print(json.dumps({
    "package": str(Path(radtriage.__file__).parent),
    "data_dir": str(s.data_dir),
    "routing_rules": str(s.routing_rules),
    "rules": len(RoutingRules.load(s.routing_rules).rules),
    "configs": sorted(p.parent.name for p in s.triton.model_repository.glob("*/config.pbtxt")),
    "pom": s.kafka_pom.is_file(),
    "backend_source": backend.SOURCE.is_file(),
    "moved": str(Settings(data_dir="/elsewhere").triton.model_repository),
}))
"""


def test_settings_defaults_resolve_in_the_installed_package(installed: Path, tmp_path: Path) -> None:
    # Run away from any checkout, with no PYTHONPATH: only the installed package is importable.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RADTRIAGE_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [installed, "-c", CHECK],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    got = json.loads(out.stdout)
    package = Path(got["package"])
    assert package.is_relative_to(installed.parent.parent), got  # the installed copy, not the clone
    assert Path(got["data_dir"]) == package / "deploy"
    assert Path(got["routing_rules"]) == package / "deploy" / "routing" / "rules.yaml"
    assert got["rules"] > 0
    assert {"ich_classifier", "lvo_detector", "cxr_triage", "mammo_birads", "nodule_detector"} <= set(
        got["configs"]
    )
    assert got["pom"] and got["backend_source"]
    assert got["moved"] == "/elsewhere/triton/model_repository"
