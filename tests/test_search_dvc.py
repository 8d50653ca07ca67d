"""The search stages under `dvc repro`: a change the trials read starts a new study, one they do not read reruns
nothing, and a budget change (n_trials) continues the study it names (the study database persists)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import REPO, deep_update
from search_fixtures import search_raw
from test_dvc import TINY, ran_stages, run

pytestmark = pytest.mark.slow


def _set(repo: Path, **changes) -> None:
    """Set dotted keys in the repo's params.yaml."""
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _study(repo: Path) -> tuple[str, list[optuna.trial.FrozenTrial]]:
    storage = f"sqlite:///{repo / 'search' / 'teacher-study.db'}"
    (name,) = optuna.study.get_all_study_names(storage=storage)
    return name, optuna.load_study(study_name=name, storage=storage).trials


@pytest.fixture
def dvc_search_repo(tmp_path) -> Path:
    repo = tmp_path / "project"
    repo.mkdir()
    shutil.copytree(REPO / "kdprune", repo / "kdprune", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / "datasets", repo / "datasets")  # prepare depends on it
    shutil.copy2(REPO / ".dvcignore", repo / ".dvcignore")
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = deep_update(deep_update(shipped, TINY), {"search": search_raw()["search"]})
    for role in ("teacher", "student"):
        raw[role]["train"]["epochs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    return repo


def test_dvc_reruns_a_study_exactly_when_what_its_trials_read_changes(dvc_search_repo):
    repo = dvc_search_repo
    assert ran_stages(run(["dvc", "repro", "search-teacher"], repo)) == {"prepare", "search-teacher"}
    name, trials = _study(repo)
    assert len(trials) == 2

    # edits the teacher's trials never read: evaluation-only tta, the student's schedule, the run's workers
    _set(repo, **{"teacher.train.tta": True, "student.train.epochs": 2, "search.workers": 2})
    assert ran_stages(run(["dvc", "repro", "search-teacher"], repo)) == set()

    # -f: the stage runs, and the study it names is finished: no new trials, the same best point
    best = (repo / "search" / "teacher.json").read_text()
    assert "search-teacher" in ran_stages(run(["dvc", "repro", "-f", "-s", "search-teacher"], repo))
    assert _study(repo) == (name, trials) and (repo / "search" / "teacher.json").read_text() == best

    # a bigger budget: the stage reruns and continues the same study (its first trials are kept)
    _set(repo, **{"search.n_trials": 3})
    assert ran_stages(run(["dvc", "repro", "search-teacher"], repo)) == {"search-teacher"}
    again, more = _study(repo)
    assert again == name and len(more) == 3
    assert [t.params for t in more[:2]] == [t.params for t in trials]

    # a param the trials read: rerun, and a new study
    _set(repo, **{"teacher.train.ema": 0.9})
    assert ran_stages(run(["dvc", "repro", "search-teacher"], repo)) == {"search-teacher"}
    storage = f"sqlite:///{repo / 'search' / 'teacher-study.db'}"
    names = optuna.study.get_all_study_names(storage=storage)
    assert len(names) == 2 and name in names  # a new study beside the old one in the persisted file
    changed = json.loads((repo / "search" / "teacher.json").read_text())["study"]["study"]
    assert changed != name

    # the code the trials run
    with (repo / "kdprune" / "optim.py").open("a") as f:
        f.write("\n# an edit to the optimizers\n")
    # prepare depends on the whole kdprune package (dvc.yaml), so it reruns too
    assert ran_stages(run(["dvc", "repro", "search-teacher"], repo)) == {"prepare", "search-teacher"}
