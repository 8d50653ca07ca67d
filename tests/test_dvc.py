"""DVC end to end in a temporary git repo: repro, no-op repro, push/pull, and a param change that reruns only
what depends on it. The stage commands are the real `kdprune stage NAME` from the venv."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, deep_update, subprocess_env, tiny_params_dict

pytestmark = pytest.mark.slow

TINY = {key: tiny_params_dict()[key] for key in ("seed", "data", "teacher", "student", "distill", "prune", "evaluate")}


def run(args: list[str], cwd: Path, check: bool = True) -> str:
    env = subprocess_env(KDPRUNE_TRACKING="off", KDPRUNE_DEVICE="cpu", CI="1")
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    if check:
        assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{output}"
    return output


def digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def cached_outs(repo: Path) -> list[Path]:
    """The outputs dvc.yaml keeps in the cache (not `cache: false`)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    outs = []
    for stage in stages.values():
        for out in stage.get("outs", []):
            if isinstance(out, str):
                outs.append(repo / out)
            elif all(opts.get("cache", True) for opts in out.values()):
                outs += [repo / name for name in out]
    return outs


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("dvc") / "project"
    repo.mkdir()
    shutil.copytree(REPO / "kdprune", repo / "kdprune", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy2(REPO / name, repo / name)
    # the shipped params.yaml with tiny models and epochs (keeps any section the stages read)
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_update(shipped, TINY), sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    run(["dvc", "config", "core.check_update", "false"], repo)
    run(["dvc", "remote", "add", "-d", "local", str(repo.parent / "remote")], repo)
    return repo


def test_dvc_pipeline(dvc_repo):
    repo = dvc_repo
    stages = set(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    core = {"prepare", "teacher", "student", "distill", "prune", "export", "evaluate", "register"}
    assert core <= stages

    # 1. repro runs every stage
    first = run(["dvc", "repro"], repo)
    assert ran_stages(first) == stages, first
    outs = cached_outs(repo)
    assert {p.relative_to(repo).as_posix() for p in outs} >= {
        "data/prepared.pt", "models/teacher.pt", "models/student.pt", "models/distilled.pt", "models/pruned.pt",
        "models/pruned.onnx"}
    assert all(p.is_file() for p in outs)
    assert (repo / "reports" / "metrics.json").is_file() and (repo / "reports" / "registration.json").is_file()
    assert (repo / "dvc.lock").is_file()
    hashes = {p: digest(p) for p in outs}

    # 2. a second repro reruns nothing and the status is clean
    second = run(["dvc", "repro"], repo)
    assert ran_stages(second) == set(), second
    assert {p: digest(p) for p in outs} == hashes
    assert "up to date" in run(["dvc", "status"], repo)

    # 3. push, lose the cache and the outputs, pull them back
    run(["dvc", "push"], repo)
    assert any((repo.parent / "remote").rglob("*"))
    shutil.rmtree(repo / ".dvc" / "cache")
    for p in outs:
        p.unlink()
    assert "deleted" in run(["dvc", "status"], repo)
    run(["dvc", "pull"], repo)
    assert {p: digest(p) for p in outs if p.is_file()} == hashes
    assert all(p.is_file() for p in outs)
    assert "up to date" in run(["dvc", "status"], repo)

    # 4. a distillation param reruns distill and what follows, not the teacher or the student
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["distill"]["temperature"] = 2.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run(["dvc", "status"], repo)
    assert "distill" in status and "teacher:" not in status and "student:" not in status
    third = run(["dvc", "repro"], repo)
    assert ran_stages(third) == {"distill", "prune", "export", "evaluate", "register"}, third
    assert digest(repo / "models" / "teacher.pt") == hashes[repo / "models" / "teacher.pt"]
    assert digest(repo / "models" / "student.pt") == hashes[repo / "models" / "student.pt"]
    assert digest(repo / "models" / "distilled.pt") != hashes[repo / "models" / "distilled.pt"]
    assert "up to date" in run(["dvc", "status"], repo)
