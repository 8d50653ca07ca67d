"""`kdprune stage|run|serve`: bad input ends as one line on stderr naming the field or file, exit code 2,
nothing half-written, and no MLflow run left RUNNING."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile

import pytest

from conftest import all_runs, deep_update, leftovers, make_imagefolder, make_tar, mlflow_uri, pattern_image, \
    subprocess_env, tiny_params_dict, write_params
from kdprune.cli import main


def error_line(captured_err: str) -> str:
    """The CLI's one error line: exactly one `kdprune: error:` line, the last one, and no traceback."""
    lines = [line for line in captured_err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("kdprune: error: ")]
    assert len(errors) == 1, captured_err
    assert lines[-1] == errors[0], captured_err
    assert "Traceback" not in captured_err
    return errors[0]


def assert_no_run_left_running(folder) -> list:
    runs = all_runs(mlflow_uri(folder))
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    return runs


def assert_nothing_written(folder):
    assert not (folder / "data" / "prepared.pt").exists()
    assert leftovers(folder) == []


# ------------------------------------------------------------------------------------------- bad params
BAD_PARAMS = {
    "misspelled key": ({"distill": {"temprature": 2}}, ["distill.temprature", "did you mean 'distill.temperature'"]),
    "unknown section": ({"registy": {"alias": "x"}}, ["registy", "did you mean 'registry'"]),
    "wrong type": ({"seed": "zero"}, ["seed", "'zero'"]),
    "epochs < 1": ({"teacher": {"train": {"epochs": 0}}}, ["teacher.train.epochs"]),
    "lr <= 0": ({"prune": {"finetune": {"lr": 0.0}}}, ["prune.finetune.lr"]),
    "prune target >= 1": ({"prune": {"target": 1.0}}, ["prune.target"]),
    "unknown arch": ({"student": {"model": {"arch": "mobilenet"}}}, ["student.model", "'mobilenet'"]),
    "unknown data source": ({"data": {"source": "imagenet"}}, ["data.source", "'imagenet'"]),
}


@pytest.mark.parametrize("updates, expected", list(BAD_PARAMS.values()), ids=list(BAD_PARAMS))
def test_bad_params_file(workdir, capsys, updates, expected):
    write_params(workdir / "params.yaml", deep_update(tiny_params_dict(), updates))
    assert main(["stage", "prepare"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "params.yaml" in line
    for part in expected:
        assert part in line
    assert_nothing_written(workdir)
    assert_no_run_left_running(workdir)


@pytest.mark.parametrize("override, expected", [
    ("teacher.train.lr=-1", "teacher.train.lr"),
    ("student.train.epochs=0", "student.train.epochs"),
    ("prune.target=0", "prune.target"),
    ("data.sorce=digits", "did you mean 'data.source'"),
    ("distill.temperature", "key=value"),
])
def test_bad_override(params_file, workdir, capsys, override, expected):
    assert main(["stage", "prepare", "--no-tracking", "-S", override]) == 2
    assert expected in error_line(capsys.readouterr().err)
    assert_nothing_written(workdir)


def test_missing_params_file(workdir, capsys):
    assert main(["stage", "prepare", "-p", "nope.yaml"]) == 2
    assert "nope.yaml" in error_line(capsys.readouterr().err)


def test_unknown_stage(params_file, workdir, capsys):
    assert main(["stage", "trian"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "'trian'" in line and "teacher" in line
    assert_no_run_left_running(workdir)


def test_run_with_bad_params_fails_before_starting_the_flow(workdir, capsys):
    write_params(workdir / "params.yaml", deep_update(tiny_params_dict(), {"distill": {"alpha": 2}}))
    assert main(["run"]) == 2
    assert "distill.alpha" in error_line(capsys.readouterr().err)
    assert_nothing_written(workdir)


def test_serve_needs_a_prefect_server(params_file, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with capsys.disabled():  # Prefect binds its log console to the stderr of its first import: not capsys's
        import flows.pipeline  # noqa: F401
    assert main(["serve"]) == 2
    assert "PREFECT_API_URL" in error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------------------------- bad data
def _tar_with(archive, members: dict[str, bytes]):
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive


def _png() -> bytes:
    out = io.BytesIO()
    pattern_image(0, (8, 8), "L").save(out, format="PNG")
    return out.getvalue()


def _missing(root):
    return root / "does-not-exist", str(root / "does-not-exist")


def _empty(root):
    (root / "empty").mkdir()
    return root / "empty", str(root / "empty")


def _no_train(root):
    archive = make_tar(make_imagefolder(root / "src", splits=("test",)), root / "data.tar.gz")
    return archive, "no train/"


def _test_class_absent(root):
    folder = make_imagefolder(root / "images")
    (folder / "test" / "horse").mkdir()
    pattern_image(7, (8, 8), "L").save(folder / "test" / "horse" / "0.png")
    return folder, "'horse'"


def _unreadable(root):
    folder = make_imagefolder(root / "images")
    (folder / "train" / "cat" / "corrupt.png").write_bytes(b"\x89PNG broken")
    return folder, str(folder / "train" / "cat" / "corrupt.png")


def _not_an_image(root):
    folder = make_imagefolder(root / "images")
    (folder / "test" / "dog" / "labels.csv").write_text("a,b\n")
    return folder, str(folder / "test" / "dog" / "labels.csv")


def _escaping(root):
    return _tar_with(root / "data.tar.gz", {"train/cat/0.png": _png(), "test/cat/0.png": _png(),
                                            "../evil.png": _png()}), "'../evil.png'"


BAD_DATA = {
    "missing dataset path": _missing,
    "empty dataset folder": _empty,
    "archive without train/": _no_train,
    "test class absent from train": _test_class_absent,
    "unreadable image": _unreadable,
    "non-image file": _not_an_image,
    "tar member escaping": _escaping,
}


@pytest.mark.parametrize("make", list(BAD_DATA.values()), ids=list(BAD_DATA))
def test_bad_imagefolder_with_tracking(workdir, tmp_path_factory, capsys, make):
    root = tmp_path_factory.mktemp("bad-data")
    path, expected = make(root)
    write_params(workdir / "params.yaml", tiny_params_dict(data={"source": "imagefolder", "path": str(path)}))
    assert main(["stage", "prepare"]) == 2
    line = error_line(capsys.readouterr().err)
    assert expected in line
    assert_nothing_written(workdir)
    assert not (root.parent / "evil.png").exists() and not (workdir.parent / "evil.png").exists()
    runs = assert_no_run_left_running(workdir)
    # a missing path or empty folder is refused before any run starts (data.check_source); the rest in prepare
    assert [(r.info.run_name, r.info.status) for r in runs] in ([], [("prepare", "FAILED")])


def test_cifar10_bad_checksum_with_tracking(workdir, capsys):
    cache = workdir / "cache"
    cache.mkdir()
    (cache / "cifar-10-python.tar.gz").write_bytes(b"junk, not the CIFAR-10 archive")
    write_params(workdir / "params.yaml", tiny_params_dict(data={"source": "cifar10", "path": str(cache)}))
    assert main(["stage", "prepare"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "cifar-10-python.tar.gz" in line and "checksum" in line
    assert_nothing_written(workdir)
    assert [(r.info.run_name, r.info.status) for r in assert_no_run_left_running(workdir)] == [("prepare", "FAILED")]


def test_diverging_training_with_tracking(project, capsys):
    (project / "models" / "teacher.pt").unlink()
    (project / "metrics" / "teacher.json").unlink()
    assert main(["stage", "teacher", "-S", "teacher.train.lr=1e30"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("kdprune: error: teacher: the loss became non-finite at step ") and "(epoch 1)" in line
    assert not (project / "models" / "teacher.pt").exists()
    assert not (project / "metrics" / "teacher.json").exists()
    assert leftovers(project) == []
    runs = assert_no_run_left_running(project)
    assert [(r.info.run_name, r.info.status) for r in runs] == [("teacher", "FAILED")]


# ---------------------------------------------------------------------------------------------- success
def test_stage_succeeds_and_logs_a_finished_run(params_file, workdir, capsys):
    assert main(["stage", "prepare", "-S", "data.val_fraction=0.2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prepare: ") and "val=288" in out
    assert (workdir / "data" / "prepared.pt").is_file()
    runs = assert_no_run_left_running(workdir)
    assert [(r.info.run_name, r.info.status) for r in runs] == [("prepare", "FINISHED")]
    assert runs[0].data.params["data.val_fraction"] == "0.2"


def test_stage_nests_under_a_parent_run(params_file, workdir, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri(workdir))
    experiment = client.create_experiment("kdprune")
    parent = client.create_run(experiment, run_name="outer")
    monkeypatch.setenv("KDPRUNE_PARENT_RUN_ID", parent.info.run_id)
    assert main(["stage", "prepare"]) == 0
    child = [r for r in all_runs(mlflow_uri(workdir)) if r.info.run_name == "prepare"]
    assert len(child) == 1 and child[0].data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_no_tracking_env_switch(params_file, workdir, monkeypatch):
    monkeypatch.setenv("KDPRUNE_TRACKING", "off")
    assert main(["stage", "prepare"]) == 0
    assert (workdir / "data" / "prepared.pt").is_file()
    assert all_runs(mlflow_uri(workdir)) == []


# ----------------------------------------------------------------------------------- the real executable
def _kdprune(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = subprocess_env(MLFLOW_TRACKING_URI=mlflow_uri(cwd))
    return subprocess.run(["kdprune", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_executable_bad_params(workdir):
    write_params(workdir / "params.yaml", deep_update(tiny_params_dict(), {"teacher": {"trian": {}}}))
    done = _kdprune(["stage", "prepare"], workdir)
    assert done.returncode == 2
    assert "did you mean 'teacher.train'" in error_line(done.stderr)
    assert_nothing_written(workdir)


@pytest.mark.slow
def test_executable_bad_data_with_tracking(workdir):
    folder = make_imagefolder(workdir / "images")
    (folder / "train" / "dog" / "readme.txt").write_text("not an image")
    write_params(workdir / "params.yaml", tiny_params_dict(data={"source": "imagefolder", "path": str(folder)}))
    done = _kdprune(["stage", "prepare"], workdir)
    assert done.returncode == 2
    assert "readme.txt" in error_line(done.stderr)
    assert_nothing_written(workdir)
    assert [(r.info.run_name, r.info.status) for r in assert_no_run_left_running(workdir)] == [("prepare", "FAILED")]


@pytest.mark.slow
def test_executable_diverging_training_with_tracking(project):
    shutil.rmtree(project / "models")
    done = _kdprune(["stage", "teacher", "-S", "teacher.train.lr=1e30"], project)
    assert done.returncode == 2
    line = error_line(done.stderr)
    assert "teacher" in line and "epoch" in line
    assert not (project / "models" / "teacher.pt").exists()
    assert leftovers(project) == []
    assert [(r.info.run_name, r.info.status) for r in assert_no_run_left_running(project)] == [("teacher", "FAILED")]


def test_params_edited_while_a_stage_runs_fail_it_so_dvc_records_nothing(workdir):
    """dvc.lock is written after the stage with the params of that moment: a stage that ran with other params must
    fail (DVC then records nothing), in one line naming the file."""
    import time

    from conftest import VENV_BIN, subprocess_env, tiny_params_dict, write_params

    raw = deep_update(tiny_params_dict(), {"teacher": {"train": {"epochs": 60}}})
    write_params(workdir / "params.yaml", raw)
    env = subprocess_env(KDPRUNE_TRACKING="off")
    assert subprocess.run([str(VENV_BIN / "kdprune"), "stage", "prepare"], cwd=workdir, env=env,
                          capture_output=True, timeout=300).returncode == 0
    log = workdir / "teacher.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(VENV_BIN / "kdprune"), "stage", "teacher"], cwd=workdir, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        while "teacher epoch 1/" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.1)
        write_params(workdir / "params.yaml", deep_update(raw, {"teacher": {"train": {"epochs": 3}}}))
        assert proc.wait(timeout=600) == 2
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("kdprune: error: params.yaml or the kdprune code changed while kdprune stage teacher ran")


def test_a_comment_in_params_is_not_a_change_but_a_value_is(tmp_path):
    from kdprune.lineage import inputs_fingerprint

    params = tmp_path / "params.yaml"
    params.write_text("teacher:\n  train:\n    epochs: 3\n")
    before = inputs_fingerprint(params)
    params.write_text("# note\nteacher:\n  train: {epochs: 3}\n")
    assert inputs_fingerprint(params) == before
    params.write_text("teacher:\n  train:\n    epochs: 5\n")
    assert inputs_fingerprint(params) != before


def test_the_flow_records_nothing_in_dvc_lock_when_params_changed_during_the_run(tmp_path):
    from flows.pipeline import dvc_commit
    from kdprune.lineage import inputs_fingerprint

    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    params = tmp_path / "params.yaml"
    params.write_text("student:\n  train:\n    epochs: 3\n")
    before = inputs_fingerprint(params)
    params.write_text("student:\n  train:\n    epochs: 5\n")
    note = dvc_commit(tmp_path, str(params), [], before)
    assert "changed during the run: outputs not recorded in dvc.lock" in note
    assert not (tmp_path / "dvc.lock").exists()


def test_smoke_shortens_every_stage_and_yields_to_later_overrides(params_file, workdir, capsys):
    from conftest import REPO
    from kdprune import config
    from kdprune.cli import SMOKE_OVERRIDES

    shipped = config.load(REPO / "params.yaml", list(SMOKE_OVERRIDES))
    assert shipped.teacher.train.epochs == shipped.student.train.epochs == shipped.prune.finetune.epochs == 1
    assert shipped.search.n_trials == 2 and shipped.prune.sensitivity == [] and shipped.data.max_train == 256
    for profile in sorted((REPO / "profiles").glob("*.yaml")):  # every shipped configuration takes the switch
        assert config.load(profile, list(SMOKE_OVERRIDES)).teacher.train.epochs == 1

    write_params(params_file, deep_update(tiny_params_dict(), {"data": {"max_train": None}}))
    assert main(["stage", "prepare", "--smoke", "--no-tracking", "-S", "data.max_test=50"]) == 0
    out = capsys.readouterr().out
    assert "train=256," in out and "test=50," in out


def test_a_search_runner_that_needs_prefect_is_refused_not_swapped_for_threads(tmp_path, monkeypatch):
    """No silent driver fallback: without Prefect's flows, search.runner processes is an error naming the field."""
    import sys

    from kdprune import cli, config
    from kdprune.errors import KdpruneError
    from kdprune.project import Paths
    from kdprune.tracking import NullTracker

    monkeypatch.setitem(sys.modules, "flows.search", None)  # importing it raises ImportError
    params = config.parse(tiny_params_dict(search={"enabled": True, "runner": "processes", "workers": 2}))
    with pytest.raises(KdpruneError, match="search.runner: processes runs its workers through Prefect"):
        cli._run_one_stage("search-teacher", params, Paths(tmp_path), NullTracker(), "cpu")
    assert not (tmp_path / "search").exists()  # nothing ran
