"""The core package stays light: importing it must not pull in Prefect, MLflow or DVC."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env

HEAVY = ("prefect", "mlflow", "dvc", "onnx", "onnxruntime", "onnxscript", "matplotlib")
STEPS = {
    "kdprune": "import kdprune",
    "stages+cli": "import kdprune.stages, kdprune.cli",
    "core": "import kdprune.config, kdprune.data, kdprune.models, kdprune.train, kdprune.pruning, "
            "kdprune.checkpoint, kdprune.losses, kdprune.metrics, kdprune.tracking, kdprune.registry, "
            "kdprune.serving, kdprune.lineage, kdprune.export, kdprune.predict, kdprune.confusion",
    "parser": "kdprune.cli.make_parser()",
    # the control: importing a pipeline tool does show up, so the check can fail
    "control": "import mlflow",
}


@pytest.fixture(scope="module")
def heavy_after_each_step() -> dict[str, list[str]]:
    """One fresh interpreter runs the steps in order and records the heavy modules loaded after each."""
    lines = ["import json, sys", "seen = {}"]
    for name, statement in STEPS.items():
        lines += [statement,
                  f"seen[{name!r}] = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})"]
    lines.append("print(json.dumps(seen))")
    done = subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("step", ["kdprune", "stages+cli", "core", "parser"])
def test_core_imports_no_pipeline_tools(heavy_after_each_step, step):
    assert heavy_after_each_step[step] == []


def test_the_check_sees_a_pipeline_tool_when_imported(heavy_after_each_step):
    assert "mlflow" in heavy_after_each_step["control"]
