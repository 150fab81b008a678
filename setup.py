"""Build hook: the data of deploy/ the running product reads, copied into the wheel as
package data of `radtriage` (radtriage/deploy/...), so an installed, non-editable radtriage
finds its defaults (routing rules, the Triton model repository, the Kafka broker's POM)
without a checkout: radtriage.settings.default_data_dir() (importlib.resources), the one
settings root `data_dir` (env RADTRIAGE_DATA_DIR). deploy/ stays the one source in the
repository; nothing is copied into the source tree.

Why a build_py step and not pyproject: [tool.setuptools] data-files is deprecated, and a
package-dir mapping of deploy/ is not picked up by packages.find (setuptools 68+ installs
only the packages it finds), so the copy is made here, at build time. Everything else is
declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# Relative to deploy/: what the running product reads (deploy/k8s and deploy/observability
# are for a deployment's tools, not for radtriage itself). Generated files (each version's
# model.py, models/backend.py) are not shipped: the launcher writes them.
SHIPPED = (
    "routing/*.yaml",
    "kafka/pom.xml",
    "notify/*.yaml",
    "triton/python_backend/model.py",
    "triton/model_repository/*/config.pbtxt",
    "triton/model_repository/*/configs/*.pbtxt",
    "triton/model_repository/*/[0-9]*/model.pt",
    "triton/model_repository/*/[0-9]*/model.onnx",
)


class build_py_with_data(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads deploy/ of the checkout itself
            return
        source, target = HERE / "deploy", Path(self.build_lib) / "radtriage" / "deploy"
        for pattern in SHIPPED:
            found = sorted(source.glob(pattern))
            if not found:
                raise SystemExit(f"setup.py: nothing in deploy/ matches {pattern}")
            for path in found:
                dest = target / path.relative_to(source)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)


setup(cmdclass={"build_py": build_py_with_data})
