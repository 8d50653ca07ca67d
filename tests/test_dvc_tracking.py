"""Stage runs made by `dvc repro` / `dvc exp run` name the git commit and the experiment, and group under one
parent run per DVC invocation. Two cheap stages (prepare, search) stand for the pipeline."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, all_runs, deep_update, fresh_mlflow_store, subprocess_env, tiny_params_dict, write_params

pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def test_dvc_stage_runs_are_tagged_and_grouped(tmp_path):
    repo = tmp_path / "project"
    repo.mkdir()
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: stages[k] for k in ("prepare", "search-teacher")}}))
    shutil.copytree(REPO / "kdprune", repo / "kdprune", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(REPO / "datasets", repo / "datasets")
    if (REPO / ".dvcignore").is_file():
        shutil.copy2(REPO / ".dvcignore", repo / ".dvcignore")
    # the shipped params (every key a stage lists in dvc.yaml must be in params.yaml: DVC's rule), shrunk
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    write_params(repo / "params.yaml", deep_update(shipped, tiny_params_dict(search={"enabled": False})))
    store = tmp_path / "store"
    store.mkdir()
    env = subprocess_env(MLFLOW_TRACKING_URI=fresh_mlflow_store(store), KDPRUNE_DEVICE="cpu")
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                 ["git", "add", "-A"], ["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x"]):
        run(args, repo, env)
    head = run(["git", "rev-parse", "HEAD"], repo, env).strip()

    run(["dvc", "repro"], repo, env)
    uri = env["MLFLOW_TRACKING_URI"]
    runs = all_runs(uri)
    parents = [r for r in runs if r.info.run_name == "dvc repro"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["kdprune.stage"] for r in children) == ["prepare", "search-teacher"]
    assert all(r.data.tags["kdprune.git_commit"] == head for r in children + parents)
    assert sorted(r.data.tags["kdprune.dvc_stage"] for r in children) == ["prepare", "search-teacher"]

    run(["dvc", "exp", "run", "-n", "seed-one", "-S", "seed=1"], repo, env)
    runs = all_runs(uri)
    exp_parents = [r for r in runs if r.info.run_name == "dvc exp run seed-one"]
    assert len(exp_parents) == 1 and exp_parents[0].data.tags["kdprune.dvc_exp"] == "seed-one"
    assert exp_parents[0].data.params["seed"] == "1"  # the experiment's row in the UI says what it ran
    assert parents[0].data.params["seed"] == "0" and "distill.temperature" in exp_parents[0].data.params
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == exp_parents[0].info.run_id]
    assert sorted(r.data.tags["kdprune.stage"] for r in children) == ["prepare", "search-teacher"]
    assert all(r.data.tags["kdprune.dvc_exp"] == "seed-one" and r.data.tags["kdprune.git_commit"] == head
               for r in children)
    assert len([r for r in runs if r.info.run_name == "dvc repro"]) == 1  # the first repro's group is its own
