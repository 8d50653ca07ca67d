"""The registry against a real `mlflow server` over HTTP, and four registrations at once into one store."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import VENV_BIN, all_runs, fresh_mlflow_store, subprocess_env
from kdprune.project import Paths
from kdprune.runner import run_stage
from kdprune.tracking import MlflowTracker, NullTracker

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with its own SQLite backend and served-artifact store; stopped afterwards."""
    port = _free_port()
    folder = tmp_path / "server"
    folder.mkdir()
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'backend.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        cwd=folder, env=subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_registration_over_http(project, tiny_params, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name, paths = tiny_params.registry.model_name, Paths(project)
    tracker = MlflowTracker()
    with tracker.run("pipeline") as parent:
        run_stage("evaluate", tiny_params, paths, parent, CPU)
        first = run_stage("register", tiny_params, paths, parent, CPU)
    assert first["promoted"] and first["version"] == "1"
    with tracker.run("pipeline") as parent:
        second = run_stage("register", tiny_params, paths, parent, CPU)
    assert second["version"] == "2" and not second["promoted"] and second["gate"]["gain"] == 0

    client = MlflowClient(mlflow_server)
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'")) == ["1", "2"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert [m.name for m in client.search_registered_models()] == [name]  # the lock was released
    assert all(r.info.status == "FINISHED" for r in all_runs(mlflow_server))
    tags = client.get_model_version(name, "1").tags
    assert tags["lineage.run.evaluate"] and tags["lineage.run.register"]

    # the champion (its ONNX file) comes back over HTTP (served artifacts)
    prepared = torch.load(paths.prepared, weights_only=True)
    champion = tracker.load_registered(f"models:/{name}@champion")
    with torch.no_grad():
        right = (champion(prepared["val_x"].float() / 255).argmax(1) == prepared["val_y"]).float().mean().item()
    assert right == pytest.approx(float(tags["val_accuracy"]), abs=1e-4)


def _variant(payload, kind: str) -> None:
    """A much worse copy of the trained model: constant class 0, constant class 3, or the head negated."""
    *_, weight, bias = payload["state_dict"]
    state = payload["state_dict"]
    if kind == "negated":
        state[weight].neg_()
        state[bias].neg_()
    else:
        state[weight].zero_()
        state[bias].zero_()
        state[bias][3 if kind == "class3" else 0] = 1.0


def test_four_concurrent_registrations(trained_project, tmp_path, tiny_params):
    """Four processes register at once into one SQLite store: every version exists, the alias ends on the best."""
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    store.mkdir()
    uri = fresh_mlflow_store(store)
    kinds = ["best", "class0", "class3", "negated"]
    projects = {}
    for kind in kinds:
        folder = tmp_path / kind
        shutil.copytree(trained_project, folder)
        if kind != "best":
            path = folder / "models" / "pruned.pt"
            payload = torch.load(path, weights_only=True)
            _variant(payload, kind)
            torch.save(payload, path)
            run_stage("export", tiny_params, Paths(folder), NullTracker(), CPU)  # the served file follows it
        projects[kind] = folder
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    procs = {kind: subprocess.Popen([str(VENV_BIN / "kdprune"), "stage", "register"], cwd=folder, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for kind, folder in projects.items()}
    outputs = {kind: proc.communicate(timeout=600)[0] for kind, proc in procs.items()}
    assert all(proc.returncode == 0 for proc in procs.values()), outputs

    import json

    results = {kind: json.loads((folder / "reports" / "registration.json").read_text())
               for kind, folder in projects.items()}
    client = MlflowClient(uri)
    name = results["best"]["model_name"]
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'")) == ["1", "2", "3", "4"]
    assert sorted(r["version"] for r in results.values()) == ["1", "2", "3", "4"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == results["best"]["version"]
    assert [m.name for m in client.search_registered_models()] == [name]
    assert all(r.info.status == "FINISHED" for r in all_runs(uri))


RACE_SCRIPT = """
import sys, time
from kdprune.tracking import MlflowTracker
import mlflow  # imported before the start line, so the processes meet the store together
start_at = float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))
print(MlflowTracker(sys.argv[1], experiment=sys.argv[3]).experiment_id)
"""


@pytest.mark.parametrize("round_", range(2))
def test_processes_meeting_a_new_store_at_once_share_one_experiment(tmp_path, round_):
    """Four processes create the same experiment at the same instant: the losers use the winner's, none fails."""
    uri = fresh_mlflow_store(tmp_path)
    start_at = str(time.time() + 12)  # after every process has imported mlflow
    procs = [subprocess.Popen([str(VENV_BIN / "python"), "-c", RACE_SCRIPT, uri, start_at, "race"],
                              env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outputs]
    ids = {out.strip() for out, _ in outputs}
    from mlflow.tracking import MlflowClient

    (experiment,) = [e for e in MlflowClient(uri).search_experiments() if e.name == "race"]
    assert ids == {experiment.experiment_id}
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on its runs


def test_the_loser_of_the_experiment_race_uses_the_winners(tmp_path, monkeypatch):
    """Deterministically the losing side of that race: the experiment appears between our look-up and our create
    (another process made it), so the create fails in the real store and the winner's experiment is used."""
    from mlflow.tracking import MlflowClient

    uri = fresh_mlflow_store(tmp_path)
    winner = MlflowClient(uri).create_experiment("race")
    looked_up = []
    real = MlflowClient.get_experiment_by_name

    def first_miss(self, name):
        looked_up.append(name)
        return None if len(looked_up) == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", first_miss)
    assert MlflowTracker(uri, experiment="race").experiment_id == winner
    assert looked_up == ["race", "race"]


def test_a_lock_names_its_holder_and_is_dead_when_its_process_is_gone_or_its_heartbeat_stale():
    from kdprune.lock import process_token
    from kdprune.tracking import _dead_holder

    gone = subprocess.Popen(["sleep", "0"])
    token = process_token(gone.pid)
    gone.wait()
    here, now = socket.gethostname(), f"{time.time():.3f}"
    assert _dead_holder({"kdprune.host": here, "kdprune.process": process_token(), "kdprune.heartbeat": now}, 60) is None
    assert "no longer running" in _dead_holder({"kdprune.host": here, "kdprune.process": token,
                                                "kdprune.heartbeat": now}, 60)
    # another host: its pid means nothing here, only the heartbeat counts
    assert _dead_holder({"kdprune.host": "elsewhere", "kdprune.process": token, "kdprune.heartbeat": now}, 60) is None
    old = f"{time.time() - 61:.3f}"
    assert "61 s ago" in _dead_holder({"kdprune.host": "elsewhere", "kdprune.process": token, "kdprune.heartbeat": old}, 60)


def test_register_killed_inside_the_registry_lock_then_rerun_takes_over_at_once(project, tiny_params):
    from mlflow.tracking import MlflowClient

    paths, name = Paths(project), tiny_params.registry.model_name
    lock = f"{name}.lock"
    assert run_stage("register", tiny_params, paths, MlflowTracker(), CPU)["version"] == "1"  # a champion to score
    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)

    def lock_held() -> bool:
        return any(m.name == lock for m in client.search_registered_models(f"name = '{lock}'"))

    for _ in range(5):  # the lock is held for about a second: kill when it is seen, else try again
        proc = subprocess.Popen([str(VENV_BIN / "kdprune"), "stage", "register"], cwd=project,
                                env=subprocess_env(MLFLOW_TRACKING_URI=uri), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while proc.poll() is None and not lock_held():
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        if lock_held():
            break
    assert lock_held(), "the register process never held the lock when it was looked at"

    started = time.monotonic()
    rerun = subprocess.run([str(VENV_BIN / "kdprune"), "stage", "register"], cwd=project, capture_output=True,
                           text=True, env=subprocess_env(MLFLOW_TRACKING_URI=uri), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert f"taking over registry lock '{lock}'" in rerun.stderr and "is no longer running" in rerun.stderr
    assert not lock_held()


def test_a_version_left_without_its_alias_by_a_killed_run_is_reconciled(project, tiny_params):
    from mlflow.tracking import MlflowClient

    from kdprune.tracking import ALIAS_PENDING

    paths, name = Paths(project), tiny_params.registry.model_name
    assert run_stage("register", tiny_params, paths, MlflowTracker(), CPU)["version"] == "1"
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    first = client.get_model_version(name, "1")
    assert ALIAS_PENDING not in first.tags  # the alias moved: nothing pending
    with MlflowTracker().run("register") as killed:  # what a run killed between version and alias leaves
        orphan = killed.register({"uri": first.source, "model_id": first.model_id}, name,
                                 {"promotion": "promoted: ..."}, alias_pending=True)
    assert client.get_model_version(name, orphan).tags[ALIAS_PENDING] == "true"

    result = run_stage("register", tiny_params, paths, MlflowTracker(), CPU)
    tags = client.get_model_version(name, orphan).tags
    assert ALIAS_PENDING not in tags and tags["promotion"].startswith("not promoted: its register run died")
    assert result["version"] == "3" and str(client.get_model_version_by_alias(name, "champion").version) == "1"


HOLD_SCRIPT = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30)
db.execute("BEGIN EXCLUSIVE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
db.rollback()
"""


def _hold_store(path: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([str(VENV_BIN / "python"), "-c", HOLD_SCRIPT, str(path), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_busy_sqlite_store_is_waited_for_then_given_up_in_one_line(tmp_path, monkeypatch, capfd):
    """Another process holds mlflow.db's write lock longer than SQLite's own busy timeout (20 s in MLflow): logging
    waits (bounded) and lands when it is free; held past the bound, the store counts as failed: nothing raised,
    the run goes on, and one line says what was not logged."""
    uri = fresh_mlflow_store(tmp_path)
    tracker = MlflowTracker(uri)
    with tracker.run("teacher") as run:
        holder = _hold_store(tmp_path / "mlflow.db", 25)
        run.log_metrics({"val_accuracy": 0.5}, step=1)  # waits for the holder, then lands
        holder.wait()
        assert run.not_logged() is None
        monkeypatch.setattr(MlflowTracker, "busy_wait_s", 3.0)
        holder = _hold_store(tmp_path / "mlflow.db", 120)
        started = time.monotonic()
        run.log_metrics({"val_accuracy": 0.6}, step=2)  # one attempt (SQLite's 20 s), then given up
        assert time.monotonic() - started < 60
        holder.kill()
        holder.wait()
    from mlflow.tracking import MlflowClient

    history = MlflowClient(uri).get_metric_history(run.run_id, "val_accuracy")
    assert [m.value for m in history] == [0.5]
    line = tracker.not_logged()
    assert "database is locked" in line and "teacher metrics" in line and "\n" not in line
    err = capfd.readouterr().err  # a line for the wait (the second call gave up at once), none of MLflow's tracebacks
    assert err.count("is busy (another process holds its write lock): waiting up to 120 s") == 1, err
    assert "Traceback" not in err and "SQLAlchemy database error" not in err, err


def test_a_store_failing_in_the_orphan_cleanup_or_inside_register_is_one_line(project, tiny_params, monkeypatch):
    import errno

    from kdprune.errors import KdpruneError
    from kdprune.lock import process_token

    uri = os.environ["MLFLOW_TRACKING_URI"]
    gone = subprocess.Popen(["sleep", "0"])
    token = process_token(gone.pid)
    gone.wait()
    tracker = MlflowTracker(uri)
    orphan = tracker.client.create_run(tracker.experiment_id, tags={"kdprune.host": socket.gethostname(),
                                                                    "kdprune.process": token})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tracker.client, "set_terminated", full_disk)
    assert tracker.close_orphans() == []  # nothing raised: the run goes on and says so at the end
    assert "orphan close run" in tracker.not_logged() and "No space left" in tracker.not_logged()
    assert tracker.client.get_run(orphan.info.run_id).info.status == "RUNNING"
    monkeypatch.undo()
    from kdprune import tracking

    tracking._LOST.clear()

    monkeypatch.setattr(MlflowTracker, "champion", lambda self, name, alias: full_disk())
    with pytest.raises(KdpruneError) as info:
        run_stage("register", tiny_params, Paths(project), MlflowTracker(uri), CPU)
    line = str(info.value)
    assert line.startswith("register: the tracking store failed (") and "\n" not in line
    assert "models/served.onnx is saved" in line
    assert [m.name for m in MlflowTracker(uri).client.search_registered_models()] == []  # the lock was released
