"""The Prefect flow end to end on digits (tiny epochs), with real Prefect (test harness) and real MLflow."""

from __future__ import annotations

import pytest

from conftest import CORE_STAGES, all_runs, mlflow_uri, tiny_params_dict, write_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _markdown_artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_pipeline_flow_end_to_end(prefect_harness, workdir):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline
    from kdprune.project import Paths
    from kdprune.runner import STAGES
    from kdprune.stages import MODEL_NAMES

    params_path = write_params(workdir / "params.yaml", tiny_params_dict())
    state = pipeline(params_path=str(params_path), device="cpu", root=str(workdir), return_state=True)
    assert state.is_completed(), state
    result = state.result()

    # outputs of every stage
    paths = Paths(workdir)
    for name in MODEL_NAMES:
        assert paths.model(name).is_file()
    assert set(result["report"]["models"]) == set(MODEL_NAMES)
    assert result["registration"]["promoted"] is True
    assert "not a DVC project" in result["dvc"]

    # MLflow: one parent run, one nested run per stage, nothing left RUNNING
    runs = all_runs(mlflow_uri(workdir))
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    children = [r for r in runs if r.info.run_id != parent_id]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent_id for r in children)
    names = [r.info.run_name for r in children]
    assert sorted(set(names)) == sorted(names)  # each stage once
    assert set(CORE_STAGES) <= set(names) <= set(STAGES)
    assert len(children) >= 7
    assert all(r.info.status == "FINISHED" for r in children)
    assert all(r.data.tags.get("kdprune.stage") == r.info.run_name for r in children)
    by_name = {r.info.run_name: r for r in children}
    assert by_name["teacher"].data.metrics["final_epochs"] == 2
    for stage in ("teacher", "student", "distill", "prune"):  # the same summary names on every training run
        assert {"final_val_accuracy", "final_epochs", "final_macs"} <= set(by_name[stage].data.metrics), stage
        assert "epochs" not in by_name[stage].data.metrics, stage
    # MLflow's Compare view lines up: every model's run carries the same metric set (pinned here)
    from kdprune.run_metrics import MODEL_METRICS, MODEL_STAGES

    assert MODEL_METRICS == ("model.test_accuracy", "model.val_accuracy", "model.macs", "model.params",
                             "model.size_kb", "model.latency_ms_b1", "model.latency_ms_batch", "model.latency_batch")
    for model, stage in MODEL_STAGES.items():
        metrics = MlflowClient(mlflow_uri(workdir)).get_run(by_name[stage].info.run_id).data.metrics
        assert set(MODEL_METRICS) <= set(metrics), (model, sorted(metrics))
        row = result["report"]["models"]["pruned" if model == "served" else model]
        assert metrics["model.macs"] == row["macs"] and metrics["model.latency_batch"] == row["latency_batch"]
        if model != "served":
            assert metrics["model.test_accuracy"] == row["test_accuracy"]
            clock = result["report"]["pruning"]["latency_clock"]
            assert metrics["model.latency_ms_b1"] == row[f"{clock}_b1"]
        else:  # the served file itself, on ONNX Runtime
            assert metrics["model.latency_ms_b1"] == row["ort_latency_ms_b1"]
            assert abs(metrics["model.test_accuracy"] - row["test_accuracy"]) <= 0.01
    assert "pruned.test_accuracy" in parents[0].data.metrics
    # the run states whether distillation paid: the paired gain over the student alone, as metrics and a tag
    gain = result["report"]["kd_gain"]
    for run in (by_name["evaluate"], parents[0]):
        assert run.data.metrics["kd_gain.gain"] == gain["gain"] and run.data.metrics["kd_gain.wins"] == gain["wins"]
    assert by_name["evaluate"].data.tags["kd_gain"] == gain["verdict"]

    client = MlflowClient(mlflow_uri(workdir))
    parent_artifacts = [a.path for a in client.list_artifacts(parent_id)]
    assert "report.md" in parent_artifacts and "confusion.png" in parent_artifacts
    evaluate_artifacts = [a.path for a in client.list_artifacts(by_name["evaluate"].info.run_id)]
    assert {"confusion.png", "per_class.json", "per_class.md"} <= set(evaluate_artifacts)
    assert "pruned.class_accuracy.0" in by_name["evaluate"].data.metrics
    assert "served.onnx" in [a.path for a in client.list_artifacts(by_name["export"].info.run_id)]

    # the registry holds a version with the champion alias, registered from the register stage's run
    name = tiny_params_dict()["registry"]["model_name"]
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == str(result["registration"]["version"])
    assert champion.run_id == by_name["register"].info.run_id

    # Prefect: a Markdown artifact with the report table
    artifacts = _markdown_artifacts(state.state_details.flow_run_id)
    reports = [a for a in artifacts if a.key == "kdprune-report"]
    assert len(reports) == 1 and reports[0].type == "markdown"
    assert "| pruned |" in reports[0].data and "champion" in reports[0].data
    assert "ONNX Runtime CPU ms" in reports[0].data and "per class" in reports[0].data

    # a rerun skips every stage (resume); its skipped model runs carry the same metric set as the trained ones
    again = pipeline(params_path=str(params_path), device="cpu", root=str(workdir), return_state=True)
    assert again.is_completed(), again
    second = [r for r in all_runs(mlflow_uri(workdir)) if r.info.run_id not in {c.info.run_id for c in runs}]
    second_by_name = {r.info.run_name: r for r in second}
    for model, stage in MODEL_STAGES.items():
        run = second_by_name[stage]
        assert run.data.tags.get("kdprune.skipped") == "outputs up to date"
        metrics = client.get_run(run.info.run_id).data.metrics
        first = client.get_run(by_name[stage].info.run_id).data.metrics
        assert {k: metrics.get(k) for k in MODEL_METRICS} == {k: first[k] for k in MODEL_METRICS}, model
        if stage != "export":  # skipped, the training runs carry the trained ones' summary names
            assert {k for k in first if k.startswith("final_")} <= set(metrics), stage


def test_flow_with_bad_params_fails_without_runs(prefect_harness, workdir):
    from flows.pipeline import pipeline

    write_params(workdir / "params.yaml", tiny_params_dict(prune={"target": 2}))
    state = pipeline(params_path=str(workdir / "params.yaml"), device="cpu", root=str(workdir), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="prune.target"):
        state.result()
    assert all_runs(mlflow_uri(workdir)) == []
    assert not (workdir / "data").exists()


def test_flow_stage_failure_marks_runs_failed(prefect_harness, workdir):
    from flows.pipeline import pipeline

    write_params(workdir / "params.yaml",
                 tiny_params_dict(data={"source": "imagefolder", "path": str(workdir / "missing")}))
    state = pipeline(params_path=str(workdir / "params.yaml"), device="cpu", root=str(workdir), return_state=True)
    assert state.is_failed()
    runs = {r.info.run_name: r.info.status for r in all_runs(mlflow_uri(workdir))}
    assert runs == {"pipeline": "FAILED", "prepare": "FAILED"}


@pytest.mark.slow
def test_the_prefect_server_script_takes_its_port(tmp_path):
    """scripts/prefect-server.sh PORT: a real server answers on that port (a second one beside 4200 is possible)."""
    import os
    import signal
    import socket
    import subprocess
    import urllib.request

    from conftest import REPO, subprocess_env

    bad = subprocess.run(["bash", str(REPO / "scripts" / "prefect-server.sh"), "42oo"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "PORT must be a number, got '42oo'" in bad.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = subprocess_env(PREFECT_HOME=str(tmp_path / "prefect"))
    done = subprocess.run(["bash", str(REPO / "scripts" / "prefect-server.sh"), str(port)], capture_output=True,
                          text=True, env=env, timeout=180)
    pid = int((REPO / ".prefect-server.pid").read_text())
    try:
        assert done.returncode == 0, done.stderr
        assert f"PREFECT_API_URL=http://127.0.0.1:{port}/api" in done.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=10) as response:
            assert response.status == 200
    finally:
        os.kill(pid, signal.SIGTERM)
