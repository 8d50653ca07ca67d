"""Beyond one machine: the search and MLflow on a real PostgreSQL, a Prefect deployment run by a process worker,
and the teacher stage under `torchrun` with DistributedDataParallel (gloo, 2 processes on the CPU)."""

from __future__ import annotations

import json
import shutil
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
    from kdprune.project import Paths
    from kdprune.tracking import NullTracker
    from flows.search import run_search
    import torch

    url = postgres.new_database(f"optuna_{runner}")
    raw = search_raw({"storage": url, "runner": runner, "workers": 2, "n_trials": 4})
    monkeypatch.chdir(search_root)
    best = run_search("search-teacher", config.parse(raw), Paths(Path(".")), NullTracker(), torch.device("cpu"))

    assert best["enabled"] is True
    # nothing went to a SQLite file (dvc.yaml's declared study file stays an empty placeholder)
    assert [p.stat().st_size for p in search_root.rglob("*.db")] in ([], [0])
    names = optuna.study.get_all_study_names(storage=url)
    assert len(names) == 1 and "teacher" in names[0]
    for name in names:
        trials = optuna.load_study(study_name=name, storage=url).trials
        states = [t.state for t in trials]
        assert states.count(State.COMPLETE) + states.count(State.PRUNED) + states.count(State.FAIL) == 4, states
        assert sorted(t.number for t in trials) == [0, 1, 2, 3]
        assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4  # workers seeded apart


# ------------------------------------------------------------------------------ torchrun + DDP (gloo, CPU)
def test_shards_partition_the_split_equally_and_the_batch_is_split_over_ranks(monkeypatch):
    import torch

    from kdprune import distributed

    x, y = torch.arange(11).view(11, 1), torch.arange(11)
    assert distributed.shard(x, y)[1].tolist() == list(range(11))  # one process: the whole split
    monkeypatch.setenv("WORLD_SIZE", "2")
    shards = []
    for r in (0, 1):
        monkeypatch.setenv("RANK", str(r))
        shards.append(distributed.shard(x, y)[1].tolist())
    assert shards == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]  # disjoint, equal sizes: ranks take equal step counts
    assert distributed.local_batch(64) == 32
    assert not distributed.is_main()


@pytest.mark.slow
def test_teacher_stage_under_torchrun_trains_with_two_gloo_processes_writes_one_model_logs_once(project):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["teacher"]["train"]["epochs"] = 2
    write_params(project / "params.yaml", raw)
    (project / "models" / "teacher.pt").unlink()
    uri = f"sqlite:///{project / 'mlflow.db'}"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "kdprune", "stage", "teacher", "--device", "cpu"],
                          cwd=project, env=subprocess_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("teacher: val_accuracy=") == 1, done.stdout  # one summary line: rank 0's
    assert done.stderr.count("teacher epoch 2/2") == 1  # epoch lines from rank 0 only
    metrics = json.loads((project / "metrics" / "teacher.json").read_text())
    assert metrics["epochs"] == 2 and metrics["val_accuracy"] > 0.5  # it learned (10 classes: chance is 0.1)
    assert (project / "models" / "teacher.pt").is_file() and not leftovers(project)
    runs = [r for r in all_runs(uri) if r.data.tags.get("kdprune.stage") == "teacher"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # logged once, by rank 0
    from mlflow.tracking import MlflowClient

    history = MlflowClient(uri).get_metric_history(runs[0].info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]


def test_non_training_stage_under_torchrun_is_refused(project, capfd, monkeypatch):
    from kdprune.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["stage", "evaluate", "--no-tracking"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun runs only the training stages" in err[0] and "kdprune stage evaluate" in err[0]


# ------------------------------------------------------------------ Prefect: a deployment run by a worker
def _api(url: str, body: dict | None = None) -> dict:
    import urllib.request

    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait_for_deployment(api: str, name: str, timeout: float) -> dict:
    import urllib.error

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return _api(f"{api}/deployments/name/{name}")
        except urllib.error.HTTPError:
            time.sleep(1)
    raise AssertionError(f"deployment {name} did not appear in {timeout:.0f} s")


def _wait_for_final_state(api: str, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _api(f"{api}/flow_runs/{run_id}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} not finished after {timeout:.0f} s: {run['state']}")


@pytest.mark.slow
def test_deployment_on_a_process_work_pool_is_run_by_a_worker_to_completed(workdir, tiny_raw):
    write_params(workdir / "params.yaml", deep_update(tiny_raw, {"serve": {"cron": "15 4 * * *"}}))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    with prefect_server(workdir, subprocess_env(MLFLOW_TRACKING_URI=uri)) as env:
        api = env["PREFECT_API_URL"]
        done = subprocess.run(["kdprune", "deploy", "--pool", "kdprune-test", "--name", "nightly",
                               "-S", "teacher.train.epochs=1", "--device", "cpu"],
                              cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        deployment = _api(f"{api}/deployments/name/kdprune-pipeline/nightly")
        assert deployment["work_pool_name"] == "kdprune-test"
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["15 4 * * *"]
        assert deployment["parameters"] == {"params_path": str(workdir / "params.yaml"),
                                            "overrides": ["teacher.train.epochs=1"], "device": "cpu",
                                            "tracking": True, "root": str(workdir)}
        # `kdprune serve` (the one-box case) passes -S, --device and --no-tracking through as well
        served = start(["kdprune", "serve", "-S", "student.train.epochs=1", "--device", "cpu", "--no-tracking"],
                       workdir / "serve.log", env, cwd=workdir)
        try:
            scheduled = _wait_for_deployment(api, "kdprune-pipeline/kdprune-scheduled", timeout=180)
        finally:
            stop(served)
        assert scheduled["parameters"] == {"params_path": str(workdir / "params.yaml"), "root": str(workdir),
                                           "overrides": ["student.train.epochs=1"], "device": "cpu",
                                           "tracking": False}
        worker = start(["prefect", "worker", "start", "--pool", "kdprune-test", "--type", "process"],
                       workdir / "worker.log", env, cwd=workdir)
        try:
            started = time.monotonic()
            run = _api(f"{api}/deployments/{deployment['id']}/create_flow_run", {})
            run = _wait_for_final_state(api, run["id"], timeout=600)
            print(f"deployment run on a process worker: {time.monotonic() - started:.1f} s")
        finally:
            stop(worker)
        assert run["state"]["type"] == "COMPLETED", (workdir / "worker.log").read_text()[-4000:]
    # the run worked in the project it was deployed from, with the override applied
    assert json.loads((workdir / "metrics" / "teacher.json").read_text())["epochs"] == 1
    assert json.loads((workdir / "metrics" / "student.json").read_text())["epochs"] == 2
    registration = json.loads((workdir / "reports" / "registration.json").read_text())
    assert str(registration["version"]) == "1" and registration["promoted"] is True
    runs = all_runs(uri)
    assert [r.info.status for r in runs if r.info.run_name == "pipeline"] == ["FINISHED"]
    assert not [r for r in runs if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_deployment_from_git_clones_pulls_the_data_with_dvc_and_registers_a_champion(tmp_path):
    """`kdprune deploy --source GIT_URL`: a process worker clones a bare repository, `dvc pull`s the images the
    repository tracks (they are in no clone), runs the pipeline to COMPLETED, and the champion is registered."""
    from mlflow.tracking import MlflowClient

    from conftest import REPO, make_imagefolder
    from test_dvc import init_project, run

    raw = deep_update(tiny_params_dict(data={"source": "imagefolder", "path": "datasets/shapes", "val_fraction": 0.2}),
                      {"registry": {"model_name": None}})
    project = init_project(tmp_path / "team" / "project", yaml.safe_dump(raw, sort_keys=False))
    for folder in ("flows", "tasks"):  # the deployment's entrypoint, flows/pipeline.py, comes from the clone
        shutil.copytree(REPO / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    make_imagefolder(project / "datasets" / "shapes", classes=("ring", "square", "star"),
                     per_class={"train": 12, "test": 4})
    run(["dvc", "add", "datasets/shapes"], project)
    run(["dvc", "push", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "shapes v1"], project)
    origin = tmp_path / "origin.git"
    run(["git", "clone", "-q", "--bare", str(project), str(origin)], tmp_path)
    # the images reach a clone only through the DVC remote
    assert "datasets/shapes/train" not in run(["git", "ls-tree", "-r", "--name-only", "HEAD"], project)

    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with prefect_server(tmp_path, subprocess_env(MLFLOW_TRACKING_URI=uri)) as env:
        api = env["PREFECT_API_URL"]
        done = subprocess.run(["kdprune", "deploy", "--pool", "git-pool", "--name", "from-git", "--source",
                               f"file://{origin}", "--device", "cpu"], cwd=project, env=env, capture_output=True,
                              text=True, timeout=300)  # from the team's checkout: its params.yaml has the cron
        assert done.returncode == 0, done.stderr[-3000:]
        deployment = _api(f"{api}/deployments/name/kdprune-pipeline/from-git")
        assert deployment["parameters"]["root"] == "." and deployment["parameters"]["pull"] is True
        worker = start(["prefect", "worker", "start", "--pool", "git-pool", "--type", "process"],
                       worker_dir / "worker.log", env, cwd=worker_dir)
        try:
            run_ = _api(f"{api}/deployments/{deployment['id']}/create_flow_run", {})
            run_ = _wait_for_final_state(api, run_["id"], timeout=600)
        finally:
            stop(worker)
        log = (worker_dir / "worker.log").read_text()
        assert run_["state"]["type"] == "COMPLETED", log[-4000:]
        assert "dvc pull: data and outputs fetched" in log
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("kdprune-shapes", "champion")
    assert str(champion.version) == "1"
    from kdprune.tracking import load_registered_model

    assert load_registered_model("models:/kdprune-shapes@champion", uri).classes == ["ring", "square", "star"]
    assert not [r for r in all_runs(uri) if r.info.status == "RUNNING"]
    assert not (project / "mlruns").exists()


# ------------------------------------------------------------------------ MLflow server on PostgreSQL
@pytest.mark.slow
def test_pipeline_logs_to_an_mlflow_server_backed_by_postgres(workdir, tiny_raw, postgres):
    import numpy as np
    import mlflow
    from mlflow.tracking import MlflowClient

    write_params(workdir / "params.yaml", tiny_raw)
    server_dir = workdir / "mlflow-server"
    server_dir.mkdir()
    with mlflow_server(postgres.new_database("mlflow"), server_dir, subprocess_env()) as url:
        done = subprocess.run(["kdprune", "run", "-S", "teacher.train.epochs=1", "-S", "student.train.epochs=1"],
                              cwd=workdir, env=subprocess_env(MLFLOW_TRACKING_URI=url), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        client = MlflowClient(url)
        runs = all_runs(url)
        from kdprune.runner import STAGES

        assert sorted(r.info.run_name for r in runs) == sorted(["pipeline", *STAGES])
        assert {r.info.status for r in runs} == {"FINISHED"}
        (teacher,) = [r for r in runs if r.info.run_name == "teacher"]
        assert teacher.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server, not a local path
        assert "teacher.pt" in [a.path for a in client.list_artifacts(teacher.info.run_id)]
        assert list((server_dir / "artifacts").rglob("teacher.pt"))  # stored where the server keeps artifacts
        champion = client.get_model_version_by_alias("kdprune-test", "champion")
        assert champion.version == "1"
        from kdprune.tracking import load_registered_model

        model = load_registered_model("models:/kdprune-test@champion", url)
        assert model.logits(np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 10)
    assert not (workdir / "mlruns").exists() and not (workdir / "mlartifacts").exists()  # nothing went local


DDP_SCRIPT = """
import sys, torch
from kdprune import config, distributed
from kdprune.models import build
from kdprune.train import Split, fit

device = distributed.setup(torch.device("cpu"))
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (96, 1, 8, 8), dtype=torch.uint8, generator=g)
y = torch.randint(0, 3, (96,), generator=g)
split = Split(x, y, torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1) * 255)
torch.manual_seed(distributed.rank())  # different start weights per rank: DDP must broadcast rank 0's
model = build({"arch": "resnet", "width": 4, "depth": 1, "dropout": 0.0}, 1, 8, 3)
params = config.TrainParams(epochs=2, batch_size=32, lr=0.05, warmup_epochs=0,
                            augment={"flip": False, "translate": 0, "cutout": 0})
model, history = fit(model, split, split, params, stage="ddp")
torch.save({"state": dict(model.named_parameters()), "losses": [r["train_loss"] for r in history],
            "train_accuracy": [r["train_accuracy"] for r in history]}, f"{sys.argv[1]}/rank{distributed.rank()}.pt")
"""


@pytest.mark.slow
def test_ddp_ranks_end_with_identical_weights_and_report_the_same_loss(tmp_path):
    import torch

    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(tmp_path / "ddp.py"), str(tmp_path)], env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # gradients were averaged: both ranks took the same steps (batch-norm running stats are per rank, as in DDP)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the loss is averaged over the ranks
    assert ranks[0]["train_accuracy"] != ranks[1]["train_accuracy"]  # yet each rank trained on its own shard


def test_a_failed_dvc_pull_is_one_line_naming_the_clone(tmp_path):
    from flows.pipeline import dvc_pull
    from kdprune.errors import KdpruneError
    from test_dvc import run

    with pytest.raises(KdpruneError, match="is not a DVC project"):
        dvc_pull(tmp_path)
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    run(["dvc", "remote", "add", "-d", "gone", str(tmp_path / "no-such-remote")], tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"not really")
    run(["dvc", "add", "images"], tmp_path)
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    shutil.rmtree(tmp_path / "images")
    with pytest.raises(KdpruneError) as failed:
        dvc_pull(tmp_path)
    message = str(failed.value)
    assert message.startswith(f"dvc pull failed in {tmp_path}: ERROR") and "\n" not in message


def test_deploy_without_a_prefect_server_is_one_error_line(workdir, tiny_raw, capfd, monkeypatch):
    from kdprune.cli import main

    write_params(workdir / "params.yaml", tiny_raw)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["deploy", "--pool", "p"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdprune: error: deploy needs a Prefect server")


def test_deployment_parameters_are_absolute_for_a_local_source_and_repository_paths_for_git(workdir):
    from flows.deployment import deployment_parameters
    from kdprune.errors import KdpruneError

    local = deployment_parameters("params.yaml", ["seed=1"], None, True, str(workdir))
    assert local == {"params_path": str(workdir / "params.yaml"), "overrides": ["seed=1"], "device": None,
                     "tracking": True, "root": str(workdir)}
    remote = deployment_parameters("profiles/x.yaml", [], "cuda", False, "https://git.example/team/kdprune.git")
    assert remote["params_path"] == "profiles/x.yaml" and remote["root"] == "."
    with pytest.raises(KdpruneError, match="path inside the repository"):
        deployment_parameters(str(workdir / "params.yaml"), [], None, True, "https://git.example/team/kdprune.git")


def test_latency_target_pruning_under_torchrun_is_refused(project, capfd, monkeypatch):
    from kdprune.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["stage", "prune", "--no-tracking", "-S", "prune.latency_target=0.3"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdprune: error: prune.latency_target measures latency")
