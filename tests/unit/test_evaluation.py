"""models/EVALUATION.md is what `python -m models.evaluate` generates from the committed inputs."""

from __future__ import annotations

import json
from pathlib import Path

from models import evaluate
from radtriage.settings import REPO_ROOT


def test_committed_report_equals_a_regeneration() -> None:
    committed = (REPO_ROOT / "models" / "EVALUATION.md").read_text()
    regenerated = evaluate.render(evaluate.load_metrics(), evaluate.load_timing())
    assert committed == regenerated, "run `python -m models.evaluate` and commit models/EVALUATION.md"
    assert evaluate.main(["--check"]) == 0


def test_every_route_model_is_in_the_report_with_its_numbers() -> None:
    metrics = evaluate.load_metrics()
    assert set(metrics) == set(evaluate.MODELS)
    report = evaluate.render(metrics, evaluate.load_timing())
    for name, m in metrics.items():
        assert f"`{name}` v{m['version']}" in report
        assert f"{m['threshold']:.4f}" in report and f"{m['auc']:.3f}" in report
        assert m["test_size"] >= 200
    timing = evaluate.load_timing()
    assert set(timing["models"]) == set(evaluate.MODELS)


def test_the_report_is_a_pure_function_of_its_inputs(tmp_path: Path) -> None:
    metrics, timing = evaluate.load_metrics(), evaluate.load_timing()
    assert evaluate.render(metrics, timing) == evaluate.render(json.loads(json.dumps(metrics)), timing)
    # A changed input changes the report (the check can fail).
    changed = json.loads(json.dumps(metrics))
    changed["cxr_triage"]["auc"] = 0.5
    assert evaluate.render(changed, timing) != evaluate.render(metrics, timing)
    # --check on a stale file fails.
    stale = tmp_path / "EVALUATION.md"
    stale.write_text("stale\n")
    assert evaluate.main(["--check", "--out", str(stale)]) == 1


def test_weights_sizes_in_the_metrics_are_the_committed_files() -> None:
    for name, m in evaluate.load_metrics().items():
        weights = evaluate.REPOSITORY / name / "1" / m["weights_file"]
        assert weights.stat().st_size == m["weights_bytes"], name
        assert m["weights_bytes"] < 10_000_000
