"""The search stage: seeded sampling, pruning, Pareto front, workers (threads, Dask), failures, resuming, bad input,
and how the best params reach the training stages."""

from __future__ import annotations

import csv
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from conftest import REPO, all_runs, mlflow_uri, subprocess_env, tiny_params_dict, write_params
from search_fixtures import (GOOD_POINT, SMALL_SPACE, dataset_id, load_trials, prepared_digits,  # noqa: F401
                             search_params, search_raw, search_root, trial_setup)
from kdprune import config
from kdprune import search as search_mod
from kdprune.config import SearchParams, SearchSpace
from kdprune.errors import KdpruneError
from kdprune.stages import Paths, effective_params, run_stage
from kdprune.tracking import MlflowTracker, NullTracker

State = optuna.trial.TrialState
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------- seeded sampling
def _synthetic_objective(space: SearchSpace):
    """Cheap, deterministic and informative (TPE has something to model after its random start-up)."""
    def objective(trial: optuna.Trial) -> float:
        p = search_mod.suggest(trial, space, distill=True, pareto=False)
        return (-abs(math.log10(p["lr"]) + 1.3) - abs(p["momentum"] - 0.9)
                - abs(p["temperature"] - 4) / 8 + (p["optimizer"] == "nesterov") * 0.1 - p["translate"] * 0.05)
    return objective


def _proposals(seed: int, storage, n_trials: int = 8) -> list[dict]:
    search = SearchParams(seed=seed, n_trials=n_trials)
    study = optuna.create_study(storage=storage, sampler=search_mod.make_sampler(search), direction="maximize")
    study.optimize(_synthetic_objective(search.space), n_trials=n_trials)
    return [t.params for t in study.trials]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_same_seed_proposes_the_same_trials_and_another_seed_does_not(kind, tmp_path):
    def storage(i):
        return None if kind == "memory" else f"sqlite:///{tmp_path / f'study{i}.db'}"

    first, second, other = _proposals(7, storage(1)), _proposals(7, storage(2)), _proposals(8, storage(3))
    assert len(first) == 8  # past TPE's 5 random start-up trials: the model-based proposals are seeded too
    assert first == second
    assert first != other
    assert set(first[0]) == {"optimizer", "lr", "momentum", "batch_size", "schedule", "warmup_epochs", "weight_decay",
                             "label_smoothing", "translate", "cutout", "dropout", "temperature", "alpha"}


def test_workers_and_resumed_runs_get_distinct_sampler_seeds():
    search = SearchParams(seed=3, n_trials=4, workers=2)

    def first_proposal(worker: int, existing: int) -> str:
        study = optuna.create_study(sampler=search_mod.make_sampler(search, worker, existing), direction="maximize")
        study.optimize(_synthetic_objective(search.space), n_trials=1)
        return json.dumps(study.trials[0].params, sort_keys=True)

    proposals = {(w, n): first_proposal(w, n) for w in range(2) for n in range(3)}
    assert first_proposal(0, 0) == proposals[0, 0]  # deterministic per (seed, worker, trials already there)
    assert len(set(proposals.values())) == len(proposals)


# ------------------------------------------------------------------------------------------- pruning
def test_hyperband_prunes_a_clearly_worse_trial(search_root):
    # epochs 2: one Hyperband bracket whose first rung is epoch 1. A good point first, then a hopeless lr.
    params = search_params({"epochs": 2, "n_trials": 4, "space": {"lr": {"low": 1e-7, "high": 0.2, "log": True}}})
    setup = trial_setup(params, search_root)
    study = search_mod.create_study(setup.study_name, setup.storage, params.search, "teacher")
    study.enqueue_trial(GOOD_POINT)
    study.enqueue_trial({**GOOD_POINT, "lr": 1e-7})
    search_mod.optimize_worker(setup, n_trials=2)

    good, hopeless = load_trials(setup)[:2]
    assert good.state == State.COMPLETE
    assert sorted(good.intermediate_values) == [1, 2]
    assert hopeless.params["lr"] == pytest.approx(1e-7)
    assert hopeless.state == State.PRUNED
    assert sorted(hopeless.intermediate_values) == [1]  # stopped after the first of its two epochs
    assert hopeless.intermediate_values[1] < good.intermediate_values[1] - 0.3


def test_pareto_student_study_has_no_pruner():
    params = search_params({"mode": "pareto"})
    assert search_mod._pruner(search_mod.TrialSetup(params, "student", "s", "sqlite://", None, None, "cpu")) is None
    pruner = search_mod._pruner(search_mod.TrialSetup(params, "teacher", "s", "sqlite://", None, None, "cpu"))
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)


# --------------------------------------------------------------------------------------- Pareto front
def _dominates(p, q) -> bool:
    return p[0] >= q[0] and p[1] <= q[1] and (p[0] > q[0] or p[1] < q[1])


@pytest.mark.parametrize("seed", range(8))
def test_pareto_front_is_exactly_the_non_dominated_points(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    if seed % 2:  # coarse grid: ties and duplicate points
        points = [(rng.randint(0, 5) / 5, float(rng.randint(1, 6) * 1000)) for _ in range(n)]
    else:
        points = [(rng.random(), rng.uniform(1e3, 1e6)) for _ in range(n)]
    front = search_mod.pareto_front(points)
    assert front == sorted(set(front))
    assert front  # a finite set always has a non-dominated point
    for i in front:
        assert not any(_dominates(points[j], points[i]) for j in range(n))
    for i in set(range(n)) - set(front):
        assert any(_dominates(points[j], points[i]) for j in front)


def test_pareto_front_small_example():
    points = [(0.9, 100.0), (0.8, 50.0), (0.85, 120.0), (0.9, 100.0), (0.5, 50.0), (0.95, 400.0)]
    # (0.85, 120) loses to (0.9, 100); (0.5, 50) to (0.8, 50); equal points do not dominate each other
    assert search_mod.pareto_front(points) == [0, 1, 3, 5]


# ------------------------------------------------------------------------------------ workers, failures
def test_two_workers_with_one_seed_do_not_duplicate_trials(search_root):
    params = search_params({"workers": 2, "n_trials": 4})
    setup = trial_setup(params, search_root)
    study = search_mod._run_study(setup, search_mod.run_in_threads)
    trials = study.trials
    assert len(trials) == 4
    # search.epochs 1: Hyperband's only rung is the last epoch, where a trial has spent its budget: none is pruned
    assert [t.state for t in trials] == [State.COMPLETE] * 4
    keys = [json.dumps(t.params, sort_keys=True) for t in trials]
    assert len(set(keys)) == 4


def test_a_diverging_trial_fails_and_the_study_goes_on(search_root):
    params = search_params({"n_trials": 4, "space": {"optimizer": ["sgd", "nesterov"],
                                                      "lr": {"low": 0.01, "high": 1e7, "log": True}}})
    tracker = MlflowTracker(tracking_uri=mlflow_uri(search_root), experiment="diverge")
    with tracker.run("search") as parent:
        setup = trial_setup(params, search_root, tracker=parent)
        study = search_mod.create_study(setup.study_name, setup.storage, params.search, "teacher")
        study.enqueue_trial({**GOOD_POINT, "optimizer": "sgd", "lr": 3e6})
        study.enqueue_trial(GOOD_POINT)
        assert search_mod.optimize_worker(setup, n_trials=2) == 2  # it did not stop at the failure
    diverged, good = load_trials(setup)[:2]
    assert diverged.state == State.FAIL
    assert good.state == State.COMPLETE and good.value > 0.5

    runs = {r.info.run_id: r for r in all_runs(tracker.tracking_uri)}
    failed = runs[diverged.user_attrs["mlflow_run_id"]]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["kdprune.trial_state"] == "failed"
    assert "loss became" in failed.data.tags["kdprune.error"]
    assert runs[good.user_attrs["mlflow_run_id"]].info.status == "FINISHED"
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]


def test_search_with_every_teacher_trial_diverging_is_one_error_line(search_root):
    params = search_params({"space": {"optimizer": ["sgd"], "lr": {"low": 1e6, "high": 1e7, "log": True},
                                      "batch_size": [128]}})
    with pytest.raises(KdpruneError) as info:
        search_mod.search(params, Paths(search_root), device=CPU)
    message = str(info.value)
    assert "\n" not in message and "no teacher trial completed" in message
    trials = load_trials(trial_setup(params, search_root))
    assert [t.state for t in trials] == [State.FAIL, State.FAIL]  # both attempted, the study went on
    assert not (search_root / "search" / "best.json").exists()


# --------------------------------------------------------------------------------------------- resume
def test_interrupted_study_resumes_with_more_trials_and_adds_none_when_complete(search_root):
    def run(n_trials: int):
        params = search_params({"n_trials": n_trials})
        setup = trial_setup(params, search_root)
        return setup.study_name, search_mod._run_study(setup, search_mod.run_in_threads)

    name2, study = run(2)
    assert len(study.trials) == 2
    name3, study = run(3)
    assert name3 == name2  # n_trials is the budget, not the study: raising it resumes
    assert len(study.trials) == 3
    first_three = [t.params for t in study.trials]
    assert first_three[2] not in first_three[:2]  # the resumed sampler does not replay the first run's points
    _, study = run(3)
    assert [t.params for t in study.trials] == first_three
    assert optuna.study.get_all_study_names(storage=search_mod.storage_url(search_params().search, search_root)) \
        == [name2]


def test_study_name_changes_with_what_the_trials_depend_on():
    base = search_params()
    name = search_mod.study_name(base, "teacher", "d1")
    same = [search_params({"n_trials": 9, "workers": 3, "compare_epochs": 2}),
            search_params({"storage": "sqlite:///elsewhere.db"})]
    for params in same:
        assert search_mod.study_name(params, "teacher", "d1") == name
    different = [search_params({"epochs": 3}), search_params({"seed": 1}),
                 search_params({"space": {"lr": {"low": 0.001, "high": 0.2, "log": True}}}),
                 config.parse({**search_raw(), "seed": 5})]
    for params in different:
        assert search_mod.study_name(params, "teacher", "d1") != name
    assert search_mod.study_name(base, "teacher", "d2") != name
    assert search_mod.study_name(base, "student", "d1") != name
    # the student's study depends on its proxy teacher: the teacher's model and the best teacher point
    student = search_mod.study_name(base, "student", "d1", {"lr": 0.1})
    assert search_mod.study_name(base, "student", "d1", {"lr": 0.2}) != student
    wider = config.parse(search_raw(teacher={"model": {"arch": "resnet", "width": 16, "depth": 1, "dropout": 0.0},
                                             "train": base.teacher.train.model_dump()}))
    assert search_mod.study_name(wider, "student", "d1", {"lr": 0.1}) != student
    assert search_mod.study_name(search_params({"n_trials": 7}), "student", "d1", {"lr": 0.1}) == student


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("override, field", [
    ("search.space.optimizer=[]", "search.space.optimizer"),
    ("search.space.batch_size=[]", "search.space.batch_size"),
    ("search.space.lr={low: 0.5, high: 0.01, log: true}", "search.space.lr"),
    ("search.space.momentum.low=0.99", "search.space.momentum"),
    ("search.n_trials=0", "search.n_trials"),
    ("search.space.optimizer=[sgd, rmsprop]", "search.space.optimizer"),
    ("search.runner=spark", "search.runner"),
])
def test_bad_search_params_are_one_error_line_naming_the_field(tmp_path, override, field):
    path = write_params(tmp_path / "params.yaml", search_raw())
    with pytest.raises(KdpruneError) as info:
        config.load(path, [override])
    message = str(info.value)
    assert "\n" not in message
    assert field in message


@pytest.mark.parametrize("url", ["sqlite:////nonexistent/dir/x.db", "postgresql://nobody:s3cret@127.0.0.1:1/x",
                                 "not a url"])
def test_unreachable_storage_is_one_error_line_without_the_password(url):
    with pytest.raises(KdpruneError) as info:
        search_mod.open_storage(url)
    message = str(info.value)
    assert message.startswith("search.storage: ")
    assert "\n" not in message
    assert "s3cret" not in message


def test_search_stage_with_unreachable_storage_fails_before_training(search_root):
    params = search_params({"storage": "sqlite:////nonexistent/dir/x.db"})
    with pytest.raises(KdpruneError, match=r"^search\.storage: cannot open"):
        run_stage("search", params, Paths(search_root), NullTracker(), CPU)
    assert not (search_root / "search").exists()


@pytest.mark.parametrize("override", ["search.n_trials=0", "search.space.optimizer=[]"])
def test_cli_bad_search_params_exit_2_with_one_line(workdir, capfd, override):
    from kdprune.cli import main

    write_params(workdir / "params.yaml", search_raw())
    assert main(["stage", "search", "--no-tracking", "-S", override]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("kdprune: error: ") and override.split("=")[0] in err[0]


def test_cli_unreachable_storage_exits_2_with_one_line(search_root):
    write_params(search_root / "params.yaml", tiny_params_dict())
    done = subprocess.run([sys.executable, "-m", "kdprune", "stage", "search", "--no-tracking",
                           "-S", "search.enabled=true", "-S", "search.storage=postgresql://nobody:s3cret@127.0.0.1:1/x"],
                          cwd=search_root, env=subprocess_env(CI="1", KDPRUNE_DEVICE="cpu"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # no Prefect traceback: the storage is checked before the flow starts
    assert lines[0].startswith("kdprune: error: search.storage: cannot open")
    assert "s3cret" not in done.stderr
    assert not (search_root / "search").exists()


# --------------------------------------------------------------------------- best params -> training
BEST = {"enabled": True, "mode": "single",
        "teacher": {**GOOD_POINT, "optimizer": "sgd", "lr": 0.0123, "schedule": "constant", "batch_size": 128},
        "student": {**GOOD_POINT, "lr": 0.031, "schedule": "constant", "temperature": 2.5, "alpha": 0.4}}


def _with_best(root, best: dict) -> Paths:
    paths = Paths(root)
    paths.search_dir.mkdir(exist_ok=True)
    paths.search_best.write_text(json.dumps(best))
    return paths


def _curve_lrs(paths: Paths, name: str) -> list[float]:
    with paths.curve(name).open() as f:
        return [float(row["lr"]) for row in csv.DictReader(f)]


def test_best_params_reach_the_training_stages(search_root):
    paths = _with_best(search_root, BEST)
    raw = search_raw()
    for role in ("teacher", "student"):
        raw[role]["train"]["schedule"] = "constant"
    params = config.parse(raw)
    assert params.search.enabled

    used = effective_params(params, paths)
    assert (used.teacher.train.lr, used.teacher.train.optimizer, used.teacher.train.batch_size) == (0.0123, "sgd", 128)
    assert used.student.train.lr == 0.031
    assert (used.distill.temperature, used.distill.alpha) == (2.5, 0.4)
    assert used.teacher.train.epochs == params.teacher.train.epochs  # the trial budget is not carried over

    run_stage("teacher", params, paths, NullTracker(), CPU)
    assert _curve_lrs(paths, "teacher") == pytest.approx([0.0123])
    tracker = MlflowTracker(tracking_uri=mlflow_uri(search_root), experiment="best")
    run_stage("distill", params, paths, tracker, CPU)
    (run,) = all_runs(tracker.tracking_uri)
    assert run.data.params["distill.temperature"] == "2.5"
    assert run.data.params["distill.alpha"] == "0.4"
    assert float(run.data.params["train.lr"]) == 0.031
    assert _curve_lrs(paths, "distilled") == pytest.approx([0.031])


@pytest.mark.parametrize("enabled, best", [(False, BEST), (True, {"enabled": False})])
def test_best_params_are_ignored_unless_search_is_enabled(search_root, enabled, best):
    paths = _with_best(search_root, best)
    raw = search_raw({"enabled": enabled})
    raw["teacher"]["train"]["schedule"] = "constant"
    params = config.parse(raw)
    assert effective_params(params, paths) == params
    run_stage("teacher", params, paths, NullTracker(), CPU)
    assert _curve_lrs(paths, "teacher") == pytest.approx([params.teacher.train.lr])


# ----------------------------------------------------------------------------------------- dvc.yaml
def test_disabled_search_stage_writes_enabled_false_and_training_stages_depend_on_it(tmp_path):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["search"]["cmd"] == "kdprune stage search"
    assert "search" in stages["search"]["outs"]  # a directory out: best.json, reports, proxy teacher
    assert "search" in stages["search"]["params"]
    for name in ("teacher", "student", "distill", "prune"):
        assert "search/best.json" in stages[name]["deps"], name

    params = config.parse(tiny_params_dict())
    assert params.search.enabled is False
    assert run_stage("search", params, Paths(tmp_path), NullTracker(), CPU) == {"enabled": False}
    assert json.loads((tmp_path / "search" / "best.json").read_text()) == {"enabled": False}
    assert not (tmp_path / "optuna.db").exists()  # switched off, it touches no study


# ------------------------------------------------------------------------------- whole stage, runners
def _check_search_outputs(root: Path, n_trials: int) -> tuple[dict, dict]:
    stored = json.loads((root / "search" / "best.json").read_text())
    assert stored["enabled"] is True
    assert {s["trials"] for s in stored["studies"].values()} == {n_trials}
    storage = search_mod.storage_url(SearchParams(), root)
    names = optuna.study.get_all_study_names(storage=storage)
    assert sorted(n.split("-")[1] for n in names) == ["student", "teacher"]
    studies = {n.split("-")[1]: optuna.load_study(study_name=n, storage=storage) for n in names}
    for study in studies.values():
        assert len(study.trials) == n_trials
    assert stored["teacher"] == studies["teacher"].best_trial.params
    with (root / "search" / "trials.csv").open() as f:
        assert len(f.read().strip().splitlines()) == 1 + 2 * n_trials
    return studies, stored


def _check_nested_runs(uri: str, studies: dict, stored: dict, n_trials: int) -> None:
    runs = all_runs(uri)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    (search_run,) = [r for r in runs if r.data.tags.get("kdprune.stage") == "search"]
    assert search_run.info.status == "FINISHED"
    trials = [r for r in runs if "kdprune.trial" in r.data.tags]
    assert len(trials) == 2 * n_trials
    assert {r.data.tags.get("mlflow.parentRunId") for r in trials} == {search_run.info.run_id}
    best_ids = {t.user_attrs["mlflow_run_id"] for role in ("teacher", "student") for t in studies[role].trials
                if t.state == State.COMPLETE and t.params == stored[role]}
    assert len(best_ids) == 2
    assert {r.info.run_id for r in trials if r.data.tags.get("kdprune.best") == "true"} == best_ids
    assert {r.info.run_id for r in runs if r.data.tags.get("kdprune.best") == "true"} == best_ids


@pytest.mark.slow
def test_dask_runner_runs_two_trials_per_study_on_a_local_cluster(search_root, monkeypatch):
    from prefect_dask import DaskTaskRunner

    from flows.search import run_search, task_runner_for

    monkeypatch.chdir(search_root)
    path = write_params(search_root / "params.yaml", tiny_params_dict())
    params = config.load(path, ["search.enabled=true", "search.runner=dask", "search.workers=2", "search.n_trials=2",
                                "search.epochs=1", "search.compare_epochs=1", "teacher.train.epochs=1",
                                "student.train.epochs=1", "teacher.model.width=4", "student.model.width=4",
                                "search.space.batch_size=[64, 128]", "search.space.translate={low: 0, high: 0}"])
    assert isinstance(task_runner_for(params.search), DaskTaskRunner)
    tracker = MlflowTracker(tracking_uri=mlflow_uri(search_root), experiment="dask")

    best = run_search(params, Paths(search_root), tracker, CPU)

    assert best["enabled"] is True and set(best["report"]) >= {"defaults teacher", "searched distilled"}
    studies, stored = _check_search_outputs(search_root, n_trials=2)
    assert stored["student"] == studies["student"].best_trial.params
    _check_nested_runs(tracker.tracking_uri, studies, stored, n_trials=2)
    # the two workers were seeded apart: no point was proposed twice
    for study in studies.values():
        assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 2


@pytest.mark.slow
def test_pareto_mode_reports_a_front_of_non_dominated_trials(search_root):
    params = search_params({"mode": "pareto", "n_trials": 2, "space": {"width": {"low": 4, "high": 8},
                                                                        "prune_target": {"low": 0.2, "high": 0.5}}})
    tracker = MlflowTracker(tracking_uri=mlflow_uri(search_root), experiment="pareto")
    best = run_stage("search", params, Paths(search_root), tracker, CPU)

    assert best["mode"] == "pareto" and {"width", "prune_target"} <= set(best["student"])
    studies, stored = _check_search_outputs(search_root, n_trials=2)
    _check_nested_runs(tracker.tracking_uri, studies, stored, n_trials=2)
    complete = [t for t in studies["student"].trials if t.state == State.COMPLETE]
    front = {t.number for t in studies["student"].best_trials}
    values = [tuple(t.values) for t in complete]
    assert {complete[i].number for i in search_mod.pareto_front(values)} == front
    table = (search_root / "search" / "pareto.md").read_text().strip().splitlines()
    assert len(table) == 2 + len(front)
    # the searched student (width, prune target) reaches the training stages
    used = effective_params(params, Paths(search_root))
    assert used.student.model.width == best["student"]["width"]
    assert used.prune.target == pytest.approx(best["student"]["prune_target"])
