"""What every training script hands to Triton: TorchScript weights and the config files.

* `export_torchscript`: trace the served module (network + sigmoids) in eval mode and check
  the saved file against the eager module at another batch size — the Triton model
  directory holds only model.py and the weights, no model source. The version directory
  also gets its generated copy of the one Python-backend `model.py` (models/backend.py),
  so a retrained version directory loads as it is.
* `write_triton_configs`: from one template per model, `config.pbtxt` (what any
  tritonserver loads by default: KIND_CPU, the local stack) and `configs/gpu.pbtxt`
  (KIND_GPU; a production server picks it with `--model-config-name=gpu`, Triton's
  custom-configuration mechanism, and models without that file fall back to
  config.pbtxt). Both are parsed with Triton's own ModelConfig protobuf before they are
  written, so a template typo fails the training run, not the server start.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from models import backend

MODEL_FILE = "model.pt"
BACKEND_FILE = backend.FILE
BACKEND_SOURCE = backend.SOURCE
GPU_CONFIG_NAME = "gpu"
GPU_NOTE = (
    "\n# Production variant: KIND_GPU. Load it with `tritonserver --model-config-name=gpu`"
    "\n# (config.pbtxt next to configs/ is the CPU one the local stack serves)."
)
CPU_NOTE = (
    "\n# Local variant: KIND_CPU. configs/gpu.pbtxt is the same with KIND_GPU, for a GPU server"
    "\n# started with `--model-config-name=gpu`."
)


# What every model's config says the same way after its own inputs and outputs (appended to
# each recipe's template): the lanes' priority queue, the instances, and the parameters the
# pipeline and the model card read.
CONFIG_TAIL = """
dynamic_batching {{
  # Wait at most 2 ms to fill a batch: a stat study must not sit behind batching.
  max_queue_delay_microseconds: 2000
  # 1 = stat, 2 = urgent, 3 = routine (radtriage lanes); requests without a priority are routine.
  priority_levels: 3
  default_priority_level: 3
  default_queue_policy {{
    # Requests may carry their own (shorter) queue timeout; none waits more than 30 s.
    timeout_action: REJECT
    default_timeout_microseconds: 30000000
    allow_timeout_override: true
  }}
}}

instance_group [
  {{
    count: {count}
    kind: {kind}
  }}
]

parameters: {{{shape_note}
  key: "input_shape"
  value: {{ string_value: "{dims}" }}
}}
parameters: {{
  key: "display_name"
  value: {{ string_value: "{display}" }}
}}
parameters: {{
  key: "model_version"
  value: {{ string_value: "{version}" }}
}}
parameters: {{
  key: "finding"
  value: {{ string_value: "{finding}" }}
}}
parameters: {{
  key: "recommended_threshold"
  value: {{ string_value: "{threshold}" }}
}}
parameters: {{
  key: "threshold_rule"
  value: {{ string_value: "{rule}" }}
}}
"""
# Where a template's input dims may one day be relaxed: what the weights were trained on.
TRAINED_SHAPE_NOTE = (
    "\n  # What the weights were trained on; model.py validates requests against it even if the"
    "\n  # dims above are ever relaxed."
)


# Every version directory is loaded, not only the latest (Triton's default policy): the
# routing rules name the version their studies go to (schemas/routing_rules.py), so weights
# dropped in as version 2 are loaded beside 1 and take studies only once a rule says "2".
VERSION_POLICY = """
# Load every version directory: each routing rule names the version it sends studies to
# (model_version in deploy/routing/rules.yaml), so a new version loads beside the old one.
version_policy: { all { } }
"""


def committed_operating_point(metrics_path: Path, model_name: str) -> tuple[float, str, str]:
    """Threshold, version and threshold rule of the committed weights, from the metrics file
    their training run wrote: what rewriting the configs without training needs."""
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("model") != model_name:
        raise ValueError(f"{metrics_path} describes {metrics.get('model')!r}, not {model_name!r}")
    return float(metrics["threshold"]), str(metrics["version"]), str(metrics["threshold_rule"])


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """The config as Triton reads it (protobuf text format); raises ParseError if it is not one."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def export_torchscript(served: torch.nn.Module, input_shape: Sequence[int], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    served = served.eval()
    path = out_dir / MODEL_FILE
    with warnings.catch_warnings(), torch.no_grad():
        # torch 2.15 marks TorchScript deprecated; it is still what loads without the source.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(served, torch.zeros((2, *input_shape)))
        traced.save(str(path))
        probe = torch.rand((3, *input_shape))
        reloaded = torch.jit.load(str(path), map_location="cpu")
        got, want = reloaded(probe), served(probe)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        if len(got) != len(want) or not all(
            torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want, strict=True)
        ):
            raise RuntimeError("exported TorchScript disagrees with the eager model")
    install_backend(out_dir)
    return path


def install_backend(version_dir: Path) -> Path:
    """The Python-backend model.py next to a version's weights (a generated copy, models/backend.py)."""
    return backend.install(version_dir)


def write_triton_configs(
    model_dir: Path,
    *,
    template: str,
    input_shape: Sequence[int],
    threshold: float,
    version: str,
    rule: str,
    display: str,
    finding: str,
    max_batch: int = 8,
    shape_note: str = "",
) -> list[Path]:
    """config.pbtxt (KIND_CPU) and configs/gpu.pbtxt (KIND_GPU) from `template` (the model's
    name, backend, inputs and outputs) and CONFIG_TAIL."""
    written = []
    for path, kind, note in (
        (model_dir / "config.pbtxt", "KIND_CPU", CPU_NOTE),
        (model_dir / "configs" / f"{GPU_CONFIG_NAME}.pbtxt", "KIND_GPU", GPU_NOTE),
    ):
        text = (template + CONFIG_TAIL).format(
            name=model_dir.name,
            max_batch=max_batch,
            dims=", ".join(str(d) for d in input_shape),
            display=display,
            version=version,
            threshold=f"{threshold:.4f}",
            rule=rule,
            weights=MODEL_FILE,
            kind=kind,
            count=1,
            variant_note=note,
            finding=finding,
            shape_note=shape_note,
        ) + VERSION_POLICY
        parse_config(text)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
