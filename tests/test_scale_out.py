"""Beyond one machine: the search and MLflow on a real PostgreSQL, a Prefect deployment run by a process worker,
and the teacher stage under `torchrun` with DistributedDataParallel (gloo, 2 processes on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import all_runs, deep_update, leftovers, subprocess_env, tiny_params_dict, write_params
from search_fixtures import search_raw, search_root, prepared_digits  # noqa: F401 - fixtures
from servers import mlflow_server, prefect_server, start, stop

State = optuna.trial.TrialState


# ------------------------------------------------------------------------------------ remote-safe config
@pytest.mark.parametrize("storage", [None, "sqlite:///optuna.db", "sqlite:////shared/optuna.db"])
def test_remote_dask_with_sqlite_storage_is_refused_in_one_line(tmp_path, storage):
    from kdprune import config
    from kdprune.errors import KdpruneError

    raw = search_raw({"runner": "dask", "dask_address": "tcp://10.0.0.5:8786", "storage": storage})
    with pytest.raises(KdpruneError) as error:
        config.parse(raw)
    message = str(error.value)
    assert "\n" not in message and message.startswith("params: search.dask_address needs")
    assert "search.storage" in message and "SQLite" in message


def test_remote_dask_with_a_server_storage_is_accepted():
    from kdprune import config

    params = config.parse(search_raw({"runner": "dask", "dask_address": "tcp://10.0.0.5:8786",
                                      "storage": "postgresql://u@db:5432/optuna"}))
    assert params.search.dask_address == "tcp://10.0.0.5:8786"


# ------------------------------------------------------------------------------- PostgreSQL: the search
@pytest.mark.slow
@pytest.mark.parametrize("runner", ["processes", "dask"])
def test_search_on_postgres_with_two_workers_accounts_for_every_trial(search_root, postgres, monkeypatch, runner):
    from kdprune import config
    from kdprune.stages import Paths
    from kdprune.tracking import NullTracker
    from flows.search import run_search
    import torch

    url = postgres.new_database(f"optuna_{runner}")
    raw = search_raw({"storage": url, "runner": runner, "workers": 2, "n_trials": 4})
    monkeypatch.chdir(search_root)
    best = run_search(config.parse(raw), Paths(Path(".")), NullTracker(), torch.device("cpu"))

    assert best["enabled"] is True and best["storage"] == url.split("@")[-1]
    assert not (search_root / "optuna.db").exists()  # nothing went to the default SQLite file
    names = optuna.study.get_all_study_names(storage=url)
    assert sorted(n.split("-")[1] for n in names) == ["student", "teacher"]
    for name in names:
        trials = optuna.load_study(study_name=name, storage=url).trials
        states = [t.state for t in trials]
        assert states.count(State.COMPLETE) + states.count(State.PRUNED) + states.count(State.FAIL) == 4, states
        assert sorted(t.number for t in trials) == [0, 1, 2, 3]
        assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4  # workers seeded apart
