"""The registry gate with real MLflow (SQLite in tmp): the alias moves only to a better model on the same data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import all_runs, mlflow_uri
from kdprune.checkpoint import load_model
from kdprune.io import read_json, write_json
from kdprune.serving import with_normalization
from kdprune.stages import Paths, run_stage
from kdprune.tracking import MlflowTracker

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


def _register_with(project, params, val_accuracy: float, dataset_id: str | None = None) -> dict:
    """Run the real register stage, with the report saying the pruned model scored `val_accuracy`."""
    paths = Paths(project)
    report = read_json(paths.report_json)
    report["models"]["pruned"]["val_accuracy"] = val_accuracy
    if dataset_id:
        report["dataset"]["dataset_id"] = dataset_id
    write_json(paths.report_json, report)
    return run_stage("register", params, paths, MlflowTracker(), CPU)


def _champion_version(client, name: str) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


def test_registry_gate_and_champion_loads_back(project, tiny_params):
    import mlflow
    from mlflow.tracking import MlflowClient

    name = tiny_params.registry.model_name
    client = MlflowClient(mlflow_uri(project))

    first = _register_with(project, tiny_params, 0.50)
    assert first["promoted"] is True and str(first["version"]) == "1" and first["champion_before"] is None
    assert _champion_version(client, name) == "1"

    worse = _register_with(project, tiny_params, 0.40)
    assert str(worse["version"]) == "2" and worse["promoted"] is False and str(worse["champion_before"]) == "1"
    assert _champion_version(client, name) == "1"

    equal = _register_with(project, tiny_params, 0.50)
    assert str(equal["version"]) == "3" and equal["promoted"] is False
    assert _champion_version(client, name) == "1"

    better = _register_with(project, tiny_params, 0.90)
    assert str(better["version"]) == "4" and better["promoted"] is True and str(better["champion_before"]) == "1"
    assert _champion_version(client, name) == "4"

    # registry tags carry what the gate compares
    version = client.get_model_version(name, "4")
    assert float(version.tags["val_accuracy"]) == 0.90
    assert version.tags["dataset_id"] == read_json(Paths(project).report_json)["dataset"]["dataset_id"]
    assert read_json(Paths(project).registration) == better

    # every register run finished; none left RUNNING
    runs = all_runs(mlflow_uri(project))
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("register", "FINISHED")] * 4

    # the champion loads back by alias and classifies a batch of several images given as pixels / 255
    champion = mlflow.pytorch.load_model(f"models:/{name}@champion")
    prepared = torch.load(Paths(project).prepared, weights_only=True)
    for n in (5, 1, 32):
        pixels = prepared["test_x"][:n].float() / 255
        with torch.no_grad():
            out = champion(pixels)
        assert out.shape == (n, 10)
    model, payload = load_model(Paths(project).model("pruned"))
    local = with_normalization(model, payload["extra"]["mean"], payload["extra"]["std"])
    pixels = prepared["test_x"].float() / 255
    with torch.no_grad():
        served, expected = champion(pixels), local(pixels)
    assert torch.allclose(served, expected, atol=1e-4)
    accuracy = (served.argmax(1) == prepared["test_y"]).float().mean().item()
    assert accuracy == pytest.approx(read_json(Paths(project).report_json)["models"]["pruned"]["test_accuracy"],
                                     abs=1e-3)

    # the pyfunc flavour serves a batch too
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    predictions = np.asarray(pyfunc.predict(pixels[:7].numpy()))
    assert predictions.shape == (7, 10)


def test_champion_from_other_data_is_replaced(project, tiny_params):
    from mlflow.tracking import MlflowClient

    name = tiny_params.registry.model_name
    client = MlflowClient(mlflow_uri(project))
    real_id = read_json(Paths(project).report_json)["dataset"]["dataset_id"]
    _register_with(project, tiny_params, 0.99, dataset_id="another-dataset")
    result = _register_with(project, tiny_params, 0.10, dataset_id=real_id)
    assert result["dataset_id"] == real_id
    # 0.10 < 0.99, but the champion's accuracy was measured on other data: the candidate takes the alias
    assert result["promoted"] is True and "another dataset" in result["reason"]
    assert _champion_version(client, name) == str(result["version"])
