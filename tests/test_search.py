"""The search stages: seeded sampling, model-based proposals, pruning, transfer, Pareto budget, workers (threads,
Dask), failures and orphaned trials, study identity, bad input, and how the best points reach the training stages."""

from __future__ import annotations

import csv
import json
import math
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from conftest import REPO, all_runs, deep_update, mlflow_uri, subprocess_env, tiny_params_dict, write_params
from search_fixtures import (GOOD_POINT, SMALL_SPACE, dataset_id, load_trials, prepared_digits,  # noqa: F401
                             search_params, search_raw, search_root, trial_setup)
from kdprune import config
from kdprune import search as search_mod
from kdprune.config import SearchParams, SearchSpace
from kdprune.errors import KdpruneError
from kdprune.project import Paths, apply_point, effective_params, new_model
from kdprune.runner import run_stage
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
    for params in first:  # one lr per optimizer family: a conditional (define-by-run) parameter
        lr = "adamw_lr" if params["optimizer"] == "adamw" else "lr"
        assert set(params) == {"optimizer", lr, "momentum", "batch_size", "schedule", "warmup_epochs",
                               "weight_decay", "label_smoothing", "translate", "cutout", "dropout", "temperature",
                               "alpha"}


def test_each_optimizer_draws_its_lr_from_its_own_range():
    space = SearchSpace(optimizer=["nesterov", "adamw"], lr={"low": 0.05, "high": 0.3, "log": True},
                        adamw_lr={"low": 1e-4, "high": 2e-4, "log": True})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    points = []
    for _ in range(30):
        trial = study.ask()
        points.append(search_mod.suggest(trial, space, distill=False, pareto=False))
        study.tell(trial, 0.0)
    adamw = [p["lr"] for p in points if p["optimizer"] == "adamw"]
    sgd = [p["lr"] for p in points if p["optimizer"] == "nesterov"]
    assert adamw and sgd
    assert all(1e-4 <= lr <= 2e-4 for lr in adamw)
    assert all(0.05 <= lr <= 0.3 for lr in sgd)


def _count_model_based(pruner, search: SearchParams, steps: int) -> tuple[int, int]:
    """Run the sampler of `search` with `pruner` on a synthetic curve; (model-based proposals, start-up trials).

    A proposal is random when TPE hands it to its random start-up sampler; we count those calls by trial."""
    sampler = search_mod.make_sampler(search)
    random_trials: set[int] = set()
    draw = sampler._random_sampler.sample_independent

    def counting(study, trial, name, distribution):
        random_trials.add(trial.number)
        return draw(study, trial, name, distribution)

    sampler._random_sampler.sample_independent = counting
    objective = _synthetic_objective(search.space)
    study = optuna.create_study(sampler=sampler, pruner=pruner, direction="maximize")
    reported: dict[int, bool] = {}

    def curve(trial: optuna.Trial) -> float:
        reported[trial.number] = search_mod._model_based(trial, search)  # what the search records per trial
        final = objective(trial)
        for step in range(1, steps + 1):
            trial.report(final * step / steps + 0.02 * step, step)  # informative early: the ranking holds
            if step < steps and trial.should_prune():
                raise optuna.TrialPruned()
        return final

    study.optimize(curve, n_trials=search.n_trials)
    assert reported == {n: n not in random_trials for n in range(search.n_trials)}  # the recorded flag is true
    assert any(t.state == State.PRUNED for t in study.trials)  # the pruner took part
    return search.n_trials - len(random_trials), search_mod.n_startup(search)


def test_with_the_shipped_configuration_most_proposals_after_the_start_up_are_model_based():
    shipped = config.load(REPO / "params.yaml", ["search.enabled=true"])
    search = shipped.search
    steps = apply_point(shipped, "teacher", {}, fraction=search.fraction).teacher.train.epochs
    model_based, startup = _count_model_based(search_mod.make_pruner(search, "teacher"), search, steps)
    assert model_based > (search.n_trials - startup) / 2, model_based
    assert model_based == search.n_trials - startup  # one bracket: every trial after the start-up is modelled


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
def test_median_pruner_stops_a_clearly_worse_trial_which_is_a_finished_mlflow_run(search_root):
    # roles train 4 epochs; fraction 0.5: trials train 2. Three good points (the pruner's start-up), then a hopeless lr.
    raw = search_raw({"fraction": 0.5, "n_trials": 4, "space": {"lr": {"low": 1e-7, "high": 0.2, "log": True}}})
    raw["teacher"]["train"].update(epochs=4, warmup_epochs=2)
    params = config.parse(raw)
    tracker = MlflowTracker(tracking_uri=mlflow_uri(search_root), experiment="prune")
    with tracker.run("search-teacher") as parent:
        setup = trial_setup(params, search_root, tracker=parent)
        study = search_mod.create_study(setup.study_name, setup.storage, params.search, "teacher")
        for lr in (0.05, 0.1, 0.08, 1e-7):
            study.enqueue_trial({**GOOD_POINT, "lr": lr, "warmup_epochs": 0.0})
        search_mod.optimize_worker(setup, n_trials=4)

    trials = load_trials(setup)
    good, hopeless = trials[:3], trials[3]
    assert [t.state for t in good] == [State.COMPLETE] * 3
    assert all(sorted(t.intermediate_values) == [1, 2] for t in good)  # half of the 4-epoch schedule
    assert hopeless.state == State.PRUNED
    assert sorted(hopeless.intermediate_values) == [1]  # stopped after the first of its two epochs
    runs = {r.info.run_id: r for r in all_runs(tracker.tracking_uri)}
    pruned_run = runs[hopeless.user_attrs["mlflow_run_id"]]
    assert pruned_run.info.status == "FINISHED"  # pruning is the search working, not a failure
    assert pruned_run.data.tags["kdprune.trial_state"] == "pruned"
    assert pruned_run.data.params["epochs"] == "2"


def test_a_trial_trains_the_real_schedule_shrunk_by_fraction():
    raw = search_raw({"fraction": 0.25})
    raw["teacher"]["train"].update(epochs=8, warmup_epochs=2, schedule="linear")
    params = config.parse(raw)
    trial = apply_point(params, "teacher", {**GOOD_POINT, "warmup_epochs": 4.0}, fraction=0.25).teacher.train
    assert (trial.epochs, trial.warmup_epochs) == (2, 1.0)  # warm-up is half the schedule in both
    real = apply_point(params, "teacher", {**GOOD_POINT, "warmup_epochs": 4.0}).teacher.train
    assert (real.epochs, real.warmup_epochs) == (8, 4.0)
    assert apply_point(params, "teacher", {}, fraction=0.01).teacher.train.epochs == 1  # never 0


def test_a_searched_temperature_reaches_the_loss_that_uses_it():
    raw = search_raw({})
    raw["distill"] = {"method": "dkd", "temperature": 4.0}
    point = {"temperature": 1.5, "alpha": 0.3}
    shared = apply_point(config.parse(raw), "student", point).distill
    assert (shared.temperature, shared.alpha, shared.dkd.temperature) == (1.5, 0.3, None)
    raw["distill"]["dkd"] = {"temperature": 3.0}  # DKD's own temperature: the searched one replaces it too
    own = apply_point(config.parse(raw), "student", point).distill
    assert (own.temperature, own.dkd.temperature) == (1.5, 1.5)


def test_pareto_student_study_has_no_pruner():
    search = search_params({"mode": "pareto"}).search
    assert search_mod.make_pruner(search, "student") is None
    assert isinstance(search_mod.make_pruner(search, "teacher"), optuna.pruners.MedianPruner)


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


def _frozen(number: int, acc: float, macs: float):
    return optuna.trial.FrozenTrial(
        number=number, state=State.COMPLETE, value=None, values=[acc, macs], datetime_start=None,
        datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
        intermediate_values={}, trial_id=number)


def test_the_chosen_point_is_the_most_accurate_within_the_macs_budget():
    front = [_frozen(0, 0.70, 100), _frozen(1, 0.80, 200), _frozen(2, 0.90, 400)]
    assert [search_mod.choose_on_front(front, budget)[0].number for budget in (None, 400, 399, 200, 150)] \
        == [2, 2, 1, 1, 0]
    chosen, within = search_mod.choose_on_front(front, 50)  # nothing fits: the smallest, and it says so
    assert (chosen.number, within) == (0, False)


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


def test_models_built_in_threads_get_their_own_seed(search_root):
    prepared = torch.load(search_root / "data" / "prepared.pt", weights_only=True)
    model = config.ModelParams(arch="resnet", width=4)
    expected = {seed: next(iter(new_model(model, prepared, seed).parameters())).detach().clone() for seed in range(6)}
    got: dict[int, torch.Tensor] = {}

    def build(seed: int) -> None:  # concurrent builds must not leak into each other through the global RNG
        for _ in range(5):
            got[seed] = next(iter(new_model(model, prepared, seed).parameters())).detach().clone()

    threads = [threading.Thread(target=build, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(got[seed], expected[seed]) for seed in range(6))


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


def test_a_pareto_point_whose_prune_target_cannot_be_reached_fails_and_the_study_goes_on(search_root, monkeypatch):
    params = search_params({"mode": "pareto", "n_trials": 2, "space": {"width": {"low": 4, "high": 4}}})
    setup = trial_setup(params, search_root, role="student")
    study = search_mod.create_study(setup.study_name, setup.storage, params.search, "student")
    real = search_mod.prune_with_kd
    targets = iter([None, "ok", "ok"])

    def first_unreachable(model, teacher, params, *args, **kwargs):
        if next(targets) is None:
            raise KdpruneError(f"prune.target: could not remove {params.prune.target:.0%} of MACs (reached 1%)")
        return real(model, teacher, params, *args, **kwargs)

    monkeypatch.setattr(search_mod, "prune_with_kd", first_unreachable)
    search_mod._run_study(setup, search_mod.run_in_threads)
    assert [t.state for t in load_trials(setup)] == [State.FAIL, State.COMPLETE]  # the study went on
    search_mod._run_study(setup, search_mod.run_in_threads)  # a rerun replaces the failed trial
    assert [t.state for t in load_trials(setup)] == [State.FAIL, State.COMPLETE, State.COMPLETE]


def test_search_with_every_teacher_trial_diverging_is_one_error_line(search_root):
    params = search_params({"space": {"optimizer": ["sgd"], "lr": {"low": 1e6, "high": 1e7, "log": True},
                                      "batch_size": [128]}})
    with pytest.raises(KdpruneError) as info:
        search_mod.search("teacher", params, Paths(search_root), device=CPU)
    message = str(info.value)
    assert "\n" not in message and "no teacher trial completed" in message
    trials = load_trials(trial_setup(params, search_root))
    assert [t.state for t in trials] == [State.FAIL, State.FAIL]  # both attempted, the study went on
    assert not (search_root / "search" / "teacher.json").exists()


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
    storage = search_mod.storage_url(search_params().search, Paths(search_root), "teacher")
    assert optuna.study.get_all_study_names(storage=storage) == [name2]


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_killed_trial_is_failed_and_replaced_on_resume_within_the_grace_period(search_root):
    params = search_params({"n_trials": 2})
    setup = trial_setup(params, search_root)
    study = search_mod.create_study(setup.study_name, setup.storage, params.search, "teacher")
    search_mod.optimize_worker(setup, n_trials=1)
    # a process killed during its second trial: RUNNING, fresh heartbeat-wise, owned by a dead pid on this host
    killed = study.ask()
    killed.set_user_attr("owner", f"{socket.gethostname()}:{_dead_pid()}")
    alive = study.ask()  # another live worker of this host (our own pid) is left alone
    alive.set_user_attr("owner", search_mod.OWNER)
    assert search_mod.fail_orphaned_trials(study) == [killed.number]
    study.tell(alive, state=State.FAIL)

    study = search_mod._run_study(setup, search_mod.run_in_threads)
    states = [t.state for t in study.trials]
    assert states.count(State.COMPLETE) == 2  # only COMPLETE/PRUNED count: the killed trial was replaced
    assert State.RUNNING not in states
    assert study.trials[killed.number].state == State.FAIL
    summary = search_mod._study_summary(study)
    assert (summary["complete"], summary["failed"], summary["running"]) == (2, 2, 0)


def test_study_identity_covers_exactly_what_the_trials_read():
    base = search_params()
    name = search_mod.study_name(base, "teacher", "d1")

    def with_train(role: str, **changes):
        raw = search_raw()
        raw[role]["train"].update(changes)
        return config.parse(raw)

    same = [search_params({"n_trials": 9, "workers": 3}), search_params({"storage": "sqlite:///elsewhere.db"}),
            search_params({"compare": {"enabled": True, "seconds": 5}}), search_params({"max_macs": 0.1}),
            search_params({"mode": "pareto"}),  # the teacher's study is never a Pareto study
            with_train("teacher", tta=True), with_train("teacher", compile=True),
            with_train("teacher", lr=0.3, batch_size=16),  # searched: the point replaces them
            with_train("student", epochs=5),  # the other role
            search_params({"space": {"temperature": {"low": 2, "high": 3}}})]  # the teacher has no KD
    for params in same:
        assert search_mod.study_name(params, "teacher", "d1") == name, params
    different = [search_params({"fraction": 0.5}), search_params({"seed": 1}),
                 search_params({"space": {"lr": {"low": 0.001, "high": 0.2, "log": True}}}),
                 config.parse({**search_raw(), "seed": 5}), with_train("teacher", epochs=3),
                 with_train("teacher", ema=0.9), with_train("teacher", norm_lr_scale=2.0)]
    for params in different:
        assert search_mod.study_name(params, "teacher", "d1") != name
    assert search_mod.study_name(base, "teacher", "d2") != name
    assert search_mod.study_name(base, "student", "d1") != name
    # the student's study depends on the trained teacher; a Pareto student study on prune.round_to too
    student = search_mod.study_name(base, "student", "d1", "teacher-hash-1")
    assert search_mod.study_name(base, "student", "d1", "teacher-hash-2") != student
    assert search_mod.study_name(search_params({"n_trials": 7}), "student", "d1", "teacher-hash-1") == student
    def with_distill(**changes):
        return config.parse(deep_update(search_raw(), {"distill": changes}))

    assert search_mod.study_name(with_distill(method="dkd"), "student", "d1", "teacher-hash-1") != student
    assert search_mod.study_name(with_distill(temperature=9.0), "student", "d1", "teacher-hash-1") == student
    dkd = search_mod.study_name(with_distill(method="dkd"), "student", "d1", "teacher-hash-1")
    own_t = with_distill(method="dkd", dkd={"temperature": 3.0})  # searched too: replaced in every trial
    assert search_mod.study_name(own_t, "student", "d1", "teacher-hash-1") == dkd
    beta = with_distill(method="dkd", dkd={"beta": 3.0})
    assert search_mod.study_name(beta, "student", "d1", "teacher-hash-1") != dkd
    pareto = search_params({"mode": "pareto"})
    rounded = config.parse(deep_update(search_raw({"mode": "pareto"}), {"prune": {"round_to": 2}}))
    assert search_mod.study_name(pareto, "student", "d1", "t") != search_mod.study_name(rounded, "student", "d1", "t")
    assert search_mod.study_name(base, "student", "d1", "t") == search_mod.study_name(
        config.parse(deep_update(search_raw(), {"prune": {"round_to": 2}})), "student", "d1", "t")


def test_study_identity_covers_the_code_the_trials_run(tmp_path, monkeypatch):
    params = search_params()
    name = search_mod.study_name(params, "teacher", "d1")
    code = tmp_path / "kdprune"
    code.mkdir()
    here = Path(search_mod.__file__).parent
    for module in search_mod.CODE_FILES:
        (code / f"{module}.py").write_bytes((here / f"{module}.py").read_bytes())
    monkeypatch.setattr(search_mod, "__file__", str(code / "search.py"))
    assert search_mod.study_name(params, "teacher", "d1") == name  # same bytes, same study
    with (code / "train.py").open("a") as f:
        f.write("\n# a change to the training loop\n")
    assert search_mod.study_name(params, "teacher", "d1") != name


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
        run_stage("search-teacher", params, Paths(search_root), NullTracker(), CPU)
    assert not (search_root / "search").exists()


@pytest.mark.parametrize("override", ["search.n_trials=0", "search.space.optimizer=[]"])
def test_cli_bad_search_params_exit_2_with_one_line(workdir, capfd, override):
    from kdprune.cli import main

    write_params(workdir / "params.yaml", search_raw())
    assert main(["stage", "search-teacher", "--no-tracking", "-S", override]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("kdprune: error: ") and override.split("=")[0] in err[0]


def test_cli_unreachable_storage_exits_2_with_one_line(search_root):
    write_params(search_root / "params.yaml", tiny_params_dict())
    done = subprocess.run([sys.executable, "-m", "kdprune", "stage", "search-teacher", "--no-tracking",
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
BEST = {"teacher": {"enabled": True, "role": "teacher",
                    "point": {**GOOD_POINT, "optimizer": "sgd", "lr": 0.0123, "schedule": "constant",
                              "batch_size": 128}},
        "student": {"enabled": True, "role": "student",
                    "point": {**GOOD_POINT, "lr": 0.031, "schedule": "constant", "temperature": 2.5, "alpha": 0.4}}}
OFF = {"teacher": {"enabled": False}, "student": {"enabled": False}}


def _with_best(root, best: dict) -> Paths:
    paths = Paths(root)
    paths.search_dir.mkdir(exist_ok=True)
    for role, found in best.items():
        paths.search_best(role).write_text(json.dumps(found))
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


@pytest.mark.parametrize("enabled, best", [(False, BEST), (True, OFF)])
def test_best_params_are_ignored_unless_search_is_enabled(search_root, enabled, best):
    paths = _with_best(search_root, best)
    raw = search_raw({"enabled": enabled})
    raw["teacher"]["train"]["schedule"] = "constant"
    params = config.parse(raw)
    assert effective_params(params, paths) == params
    run_stage("teacher", params, paths, NullTracker(), CPU)
    assert _curve_lrs(paths, "teacher") == pytest.approx([params.teacher.train.lr])


# ----------------------------------------------------------------------------------------- dvc.yaml
def test_search_stages_run_before_the_stages_that_use_them(tmp_path):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    order = list(stages)
    assert order.index("search-teacher") < order.index("teacher") < order.index("search-student") \
        < order.index("student") < order.index("distill")
    assert "models/teacher.pt" in stages["search-student"]["deps"]  # the student study distils from the teacher
    for role in ("teacher", "student"):
        assert stages[f"search-{role}"]["cmd"] == f"kdprune stage search-{role}"
        assert f"search/{role}.json" in stages[f"search-{role}"]["outs"]
        assert any(isinstance(o, dict) and f"search/{role}-study.db" in o for o in stages[f"search-{role}"]["outs"])
    assert "search/teacher.json" in stages["teacher"]["deps"]
    for name in ("student", "distill", "prune"):
        assert "search/student.json" in stages[name]["deps"], name
    for role in ("teacher", "student"):  # the code the trials run: what their study names hash, no more
        code = {d for d in stages[f"search-{role}"]["deps"] if d.startswith("kdprune")}
        assert code == {f"kdprune/{name}.py" for name in search_mod.CODE_FILES}

    params = config.parse(tiny_params_dict())
    assert params.search.enabled is False
    for role in ("teacher", "student"):
        assert run_stage(f"search-{role}", params, Paths(tmp_path), NullTracker(), CPU) == {"enabled": False}
        assert json.loads((tmp_path / "search" / f"{role}.json").read_text()) == {"enabled": False}
        assert (tmp_path / "search" / f"{role}-study.db").stat().st_size == 0  # declared out; no study touched
    assert run_stage("compare", params, Paths(tmp_path), NullTracker(), CPU) == {"enabled": False}


@pytest.mark.parametrize("params_file", ["params.yaml", "profiles/cifar10-cpu-quick.yaml",
                                         "profiles/cifar10-gpu.yaml"])
def test_every_param_the_search_stages_list_is_in_the_params_files(params_file):
    """DVC refuses a stage whose listed param is missing; a profile copied over params.yaml must run under DVC."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    raw = yaml.safe_load((REPO / params_file).read_text())
    for stage in ("search-teacher", "search-student", "compare"):
        for key in stages[stage]["params"]:
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{params_file}: {key} ({stage})"
                node = node[part]


# ------------------------------------------------------------------------------- whole stage, runners
def _check_search_outputs(root: Path, n_trials: int) -> dict:
    studies = {}
    for role in ("teacher", "student"):
        stored = json.loads((root / "search" / f"{role}.json").read_text())
        assert stored["enabled"] is True
        assert stored["study"]["complete"] + stored["study"]["pruned"] == n_trials
        storage = search_mod.storage_url(SearchParams(), Paths(root), role)
        (name,) = optuna.study.get_all_study_names(storage=storage)
        assert name == stored["study"]["study"] and name.startswith(f"kdprune-{role}-")
        studies[role] = study = optuna.load_study(study_name=name, storage=storage)
        assert len(study.trials) == n_trials
        (chosen,) = [t for t in study.trials if t.number == stored["trial"]]
        assert stored["point"] == chosen.user_attrs["point"]
        with (root / "search" / f"{role}-trials.csv").open(newline="") as f:
            rows = list(csv.reader(f))
        assert len(rows) == 1 + n_trials and {len(r) for r in rows} == {len(rows[0])}  # valid CSV
        assert [json.loads(r[-1]) for r in rows[1:]] == [t.user_attrs["point"] for t in study.trials]
    return studies


def _check_nested_runs(uri: str, studies: dict, n_trials: int) -> None:
    runs = all_runs(uri)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    for role, study in studies.items():
        (search_run,) = [r for r in runs if r.data.tags.get("kdprune.stage") == f"search-{role}"]
        assert search_run.info.status == "FINISHED"
        trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == search_run.info.run_id]
        assert len(trials) == n_trials
        best = [r.info.run_id for r in trials if r.data.tags.get("kdprune.best") == "true"]
        assert len(best) == 1


def _run_both(params, root: Path, tracker, stage=run_stage) -> None:
    """search-teacher, teacher, search-student: the order the pipeline runs them."""
    paths = Paths(root)
    stage("search-teacher", params, paths, tracker, CPU)
    run_stage("teacher", params, paths, NullTracker(), CPU)
    stage("search-student", params, paths, tracker, CPU)


@pytest.mark.slow
def test_dask_runner_runs_two_trials_per_study_on_a_local_cluster(search_root, monkeypatch):
    from prefect_dask import DaskTaskRunner

    from flows.search import run_search, task_runner_for

    monkeypatch.chdir(search_root)
    path = write_params(search_root / "params.yaml", tiny_params_dict())
    params = config.load(path, ["search.enabled=true", "search.runner=dask", "search.workers=2", "search.n_trials=2",
                                "search.fraction=1", "teacher.train.epochs=1",
                                "student.train.epochs=1", "teacher.model.width=4", "student.model.width=4",
                                "search.space.batch_size=[64, 128]", "search.space.translate={low: 0, high: 0}"])
    assert isinstance(task_runner_for(params.search), DaskTaskRunner)
    tracker = MlflowTracker(tracking_uri=mlflow_uri(search_root), experiment="dask")

    _run_both(params, search_root, tracker, stage=lambda name, *args: run_search(name, *args))

    studies = _check_search_outputs(search_root, n_trials=2)
    _check_nested_runs(tracker.tracking_uri, studies, n_trials=2)
    # the two workers were seeded apart: no point was proposed twice
    for study in studies.values():
        assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 2


@pytest.mark.slow
def test_pareto_mode_trains_the_most_accurate_front_point_within_the_macs_budget(search_root):
    params = search_params({"mode": "pareto", "n_trials": 5, "max_macs": 0.6,
                            "space": {"width": {"low": 2, "high": 8}, "prune_target": {"low": 0.1, "high": 0.7}}})
    tracker = MlflowTracker(tracking_uri=mlflow_uri(search_root), experiment="pareto")
    _run_both(params, search_root, tracker)
    best = json.loads((search_root / "search" / "student.json").read_text())

    assert best["mode"] == "pareto" and {"width", "prune_target"} <= set(best["point"])
    studies = _check_search_outputs(search_root, n_trials=5)
    _check_nested_runs(tracker.tracking_uri, studies, n_trials=5)
    complete = [t for t in studies["student"].trials if t.state == State.COMPLETE]
    front = [complete[i] for i in search_mod.pareto_front([tuple(t.values) for t in complete])]
    assert {t.number for t in front} == {t.number for t in studies["student"].best_trials}
    budget = 0.6 * best["student_macs"]
    assert best["max_macs"] == pytest.approx(budget)
    within = [t for t in front if t.values[1] <= budget]
    if within:  # the most accurate point under the budget, not the most accurate point
        assert best["within_budget"] and best["macs"] <= budget
        assert best["val_accuracy"] == max(t.values[0] for t in within)
    else:
        assert not best["within_budget"] and best["macs"] == min(t.values[1] for t in front)
    table = (search_root / "search" / "pareto.md").read_text().strip().splitlines()
    assert len(table) == 4 + len(front)
    (marked,) = [line for line in table if line.startswith("| **x**")]
    assert f"| {best['trial']} |" in marked
    # the chosen student (width, prune target) reaches the training stages
    used = effective_params(params, Paths(search_root))
    assert used.student.model.width == best["point"]["width"]
    assert used.prune.target == pytest.approx(best["point"]["prune_target"])


def test_the_student_study_samples_alpha_only_for_a_method_that_reads_it(tmp_path):
    """DKD never reads distill.alpha: its trials do not sample it, and the alpha range is not part of its identity."""
    space = SearchSpace()
    for method, has_alpha in (("dkd", False), ("hinton", True), ("fitnets", True)):
        study = optuna.create_study()
        study.optimize(lambda t: len(search_mod.suggest(t, space, distill=method, pareto=False)), n_trials=1)
        assert ("alpha" in study.trials[0].params) is has_alpha, method
        assert "temperature" in study.trials[0].params

    def name(method, alpha_high):
        raw = tiny_params_dict(distill={"method": method},
                               search={"enabled": True, "space": {"alpha": {"low": 0.1, "high": alpha_high}}})
        return search_mod.study_name(config.parse(raw), "student", "data", "teacher")

    assert name("dkd", 0.9) == name("dkd", 0.5)
    assert name("hinton", 0.9) != name("hinton", 0.5)


def test_pareto_trials_prune_with_the_prune_stages_pruner_and_settings(search_root, monkeypatch):
    """One pruner: a trial calls compress.prune_with_kd with the trial's params (the sampled MACs target, the
    stage's method and rounds) on the trial's schedule, then the stage's KD fine-tune."""
    from kdprune import compress

    params = search_params({"mode": "pareto", "n_trials": 1, "space": {"width": {"low": 4, "high": 4}}})
    params = params.model_copy(update={"prune": params.prune.model_copy(update={"method": "sparse", "steps": 2,
                                                                               "latency_target": 0.3})})
    setup = trial_setup(params, search_root, role="student")
    search_mod.create_study(setup.study_name, setup.storage, params.search, "student")
    calls = []

    def spy(model, teacher, trial_params, train, val, example, fraction=1.0, stage="prune"):
        calls.append((trial_params.prune, fraction))
        return compress.prune_with_kd(model, teacher, trial_params, train, val, example, fraction, stage)

    monkeypatch.setattr(search_mod, "prune_with_kd", spy)
    search_mod._run_study(setup, search_mod.run_in_threads)
    ((prune, fraction),) = calls
    (trial,) = load_trials(setup)
    assert trial.state == State.COMPLETE and fraction == params.search.fraction
    assert prune.target == pytest.approx(trial.params["prune_target"])  # the sampled point
    assert (prune.method, prune.steps, prune.latency_target) == ("sparse", 2, None)  # MACs: the trial's objective
