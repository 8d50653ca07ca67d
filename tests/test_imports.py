"""The core package stays light: importing it must not pull in Prefect, MLflow or DVC."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
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


# ------------------------------------------------------------------------------------------- structure
def test_the_flow_does_not_import_the_cli_back():
    """The drivers share helpers through the core (kdprune.signals), not through each other."""
    code = "import sys, flows.pipeline; print('kdprune.cli' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_only_kdprune_is_installed_not_generic_flows_or_tasks_packages():
    import setuptools
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = setuptools.find_packages(str(REPO), include=include)
    assert "kdprune" in packages and not [p for p in packages if p.split(".")[0] in ("flows", "tasks")]


def test_telemetry_switches_have_one_definition_that_env_sh_exports():
    from kdprune.telemetry import TELEMETRY_OFF

    env = {k: v for k, v in subprocess_env().items() if k not in TELEMETRY_OFF}
    done = subprocess.run(["bash", "-c", "source scripts/env.sh && env"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    exported = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert {k: exported.get(k) for k in TELEMETRY_OFF} == TELEMETRY_OFF
    # and nowhere else in the project's code are they spelled out
    for path in [*REPO.glob("kdprune/*.py"), *REPO.glob("flows/*.py"), *REPO.glob("tests/*.py"),
                 *REPO.glob("scripts/*.sh")]:
        if path.name not in ("telemetry.py", Path(__file__).name):
            assert "MLFLOW_DISABLE_TELEMETRY=" not in path.read_text() and \
                '"MLFLOW_DISABLE_TELEMETRY":' not in path.read_text(), path


HELP_SCRIPT = """
import sys
from kdprune.cli import main
for args in (["--help"], ["run", "--help"], ["stage", "--help"], ["serve", "--help"], ["deploy", "--help"],
             ["predict", "--help"]):
    try:
        main(args)
    except SystemExit as done:
        assert done.code == 0, args
print(sorted(m for m in ("torch", "torchvision", "mlflow", "prefect", "dvc", "optuna", "numpy") if m in sys.modules))
"""


def test_every_help_answers_without_loading_torch_or_a_pipeline_tool():
    """`kdprune --help` must be instant: the parser is built from light modules only (measured: see README)."""
    done = subprocess.run([sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_light_stage_list_is_the_runners():
    from kdprune.runner import STAGES
    from kdprune.stage_names import STAGE_NAMES

    assert tuple(STAGES) == STAGE_NAMES
