"""DVC end to end in a temporary git repo: repro, no-op repro, push/pull, and a param change that reruns only
what depends on it. The stage commands are the real `kdprune stage NAME` from the venv."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, deep_update, make_imagefolder, pattern_image, subprocess_env, tiny_params_dict

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
    """The files of the outputs dvc.yaml keeps in the cache (not `cache: false`); a directory out gives its files."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    outs = []
    for stage in stages.values():
        for out in stage.get("outs", []):
            if isinstance(out, str):
                outs.append(repo / out)
            elif all(opts.get("cache", True) for opts in out.values()):
                outs += [repo / name for name in out]
    return [file for out in outs for file in (sorted(f for f in out.rglob("*") if f.is_file()) if out.is_dir() else [out])]


def init_project(repo: Path, params_text: str) -> Path:
    """A git + DVC project at `repo` with this tree's code, dvc.yaml and `params_text`, all committed."""
    repo.mkdir(parents=True)
    shutil.copytree(REPO / "kdprune", repo / "kdprune", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(REPO / "datasets", repo / "datasets")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO / name, repo / name)
    (repo / "params.yaml").write_text(params_text)
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "test@example.com"], repo)
    run(["git", "config", "user.name", "test"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    run(["dvc", "config", "core.check_update", "false"], repo)
    run(["dvc", "remote", "add", "-d", "local", str(repo.parent / "remote")], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "project"], repo)
    return repo


def tiny_shipped_params() -> str:
    """The shipped params.yaml, comments and layout kept, with tiny models and one epoch per stage."""
    text = (REPO / "params.yaml").read_text()
    for pattern, value in [(r"width: 8\b", "width: 4"), (r"width: 32\b", "width: 8"), (r"\bepochs: (30|10)\b", "epochs: 1"),
                           (r"warmup_epochs: 2\b", "warmup_epochs: 0"), (r"latency_batch: 256", "latency_batch: 8"),
                           (r"latency_repeats: 20", "latency_repeats: 2"),
                           # a width-4 student has no 70% to remove in steps of 4 channels
                           (r"target: 0\.7 ", "target: 0.5 "), (r"round_to: 4 ", "round_to: 1 "),
                           # at batch 8 a tiny model's time is per-call overhead: no latency to buy (test_stages has
                           # the latency target through the stage)
                           (r"latency_target: 0\.3 ", "latency_target:     ")]:
        text, count = re.subn(pattern, value, text)
        assert count, pattern
    return text


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    # the shipped params.yaml with tiny models and epochs (keeps any section the stages read)
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    return init_project(tmp_path_factory.mktemp("dvc") / "project", yaml.safe_dump(deep_update(shipped, TINY), sort_keys=False))


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
        "models/pruned.onnx", "models/served.onnx"}
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
    assert ran_stages(third) == {"compare", "distill", "prune", "export", "evaluate", "register"}, third
    assert digest(repo / "models" / "teacher.pt") == hashes[repo / "models" / "teacher.pt"]
    assert digest(repo / "models" / "student.pt") == hashes[repo / "models" / "student.pt"]
    assert digest(repo / "models" / "distilled.pt") != hashes[repo / "models" / "distilled.pt"]
    assert "up to date" in run(["dvc", "status"], repo)


def status(repo: Path, *targets: str) -> dict:
    """`dvc status --json`: {stage: [changes]} for every stage that is not up to date."""
    return json.loads(run(["dvc", "status", "--json", *targets], repo).strip().splitlines()[-1])


@pytest.fixture(scope="module")
def team_repo(tmp_path_factory) -> Path:
    """A project that ran the pipeline on the shipped params (tiny), committed its results and pushed them."""
    repo = init_project(tmp_path_factory.mktemp("team") / "project", tiny_shipped_params())
    run(["dvc", "repro"], repo)
    run(["git", "add", "dvc.lock", "metrics", "plots", "reports", "search"], repo)
    run(["git", "commit", "-q", "-m", "results"], repo)
    run(["dvc", "push"], repo)
    assert run(["git", "status", "--porcelain"], repo).strip() == ""  # nothing else to commit, nothing dirty
    return repo


def test_team_round_trip(team_repo, tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(team_repo), str(clone)], tmp_path)
    assert (clone / "metrics" / "teacher.json").is_file()  # metrics come with git
    assert not (clone / "models").exists()
    run(["dvc", "pull"], clone)
    assert (clone / "models" / "pruned.pt").is_file()
    assert status(clone) == {}
    assert ran_stages(run(["dvc", "repro"], clone)) == set()
    assert run(["git", "status", "--porcelain"], clone).strip() == ""


def _experiments(shown: list) -> dict[str, dict]:
    """`dvc exp show --json` -> {rev: data, name: data} for the workspace, the baseline and every experiment."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("data"), dict) and "metrics" in node["data"]:
                found[node["rev"]] = node["data"]
                if node.get("name"):
                    found[node["name"]] = node["data"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    return found


def test_exp_run_is_visible_to_exp_show_and_keeps_params_yaml(team_repo):
    repo = team_repo
    output = run(["dvc", "exp", "run", "--temp", "-n", "t2", "-S", "distill.temperature=2"], repo)
    # compare reads distill too; disabled, it writes the same compare.json; the teacher and student stay
    assert ran_stages(output) == {"compare", "distill", "prune", "export", "evaluate", "register"}, output
    shown = _experiments(json.loads(run(["dvc", "exp", "show", "--json"], repo)))
    head = run(["git", "rev-parse", "HEAD"], repo).strip()
    baseline, experiment = shown[head], shown["t2"]
    for data in (baseline, experiment):  # real numbers, not DVC's `!` for a metrics file it cannot load
        metrics = data["metrics"]
        assert isinstance(metrics["metrics/teacher.json"]["data"]["val_accuracy"], float)
        assert isinstance(metrics["reports/metrics.json"]["data"]["models"]["pruned"]["test_accuracy"], float)
    assert experiment["params"]["params.yaml"]["data"]["distill"]["temperature"] == 2
    assert baseline["params"]["params.yaml"]["data"]["distill"]["temperature"] == 4.0
    assert experiment["metrics"]["metrics/teacher.json"] == baseline["metrics"]["metrics/teacher.json"]  # not rerun
    # DVC rewrote params.yaml for the experiment: only the line it set differs
    before = (repo / "params.yaml").read_text().splitlines()
    after = run(["git", "show", f"{experiment['rev']}:params.yaml"], repo).splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1 and "temperature: 2" in changed[0][1], changed
    assert "distilled" in run(["dvc", "metrics", "diff", head, experiment["rev"]], repo)


def test_a_code_default_change_makes_the_training_stages_stale(team_repo):
    config_py = team_repo / "kdprune" / "config.py"
    original = config_py.read_text()
    changed = original.replace("alpha: float = Field(default=0.9", "alpha: float = Field(default=0.8")
    assert changed != original
    try:
        config_py.write_text(changed)
        stale = status(team_repo)
        assert {"teacher", "student", "distill", "prune"} <= set(stale)
        assert "kdprune" in json.dumps(stale["teacher"])
    finally:
        config_py.write_text(original)
    assert status(team_repo) == {}


def test_changing_an_image_marks_prepare_changed(tmp_path):
    params = tiny_params_dict(data={"source": "imagefolder", "path": "datasets/images", "image_size": None,
                                    "val_fraction": 0.25, "test_fraction": 0.2})
    repo = init_project(tmp_path / "project", yaml.safe_dump(params, sort_keys=False))
    images = make_imagefolder(repo / "datasets" / "images")
    run(["dvc", "add", "datasets/images"], repo)  # the dataset versioned by DVC: datasets/images.dvc
    assert ran_stages(run(["dvc", "repro", "prepare"], repo)) == {"prepare"}
    assert "prepare" not in status(repo, "prepare")
    pattern_image(1000, (8, 8), "L").save(images / "train" / "cat" / "0.png")
    changed = status(repo, "prepare")
    assert "prepare" in changed and "datasets" in json.dumps(changed["prepare"]), changed
