"""The registry gate with real MLflow (SQLite in tmp): the champion is re-scored on the candidate's validation
images, and the alias moves only on a real, affordable gain; what is registered reproduces what is tagged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO, all_runs, mlflow_uri, tiny_params_dict
from kdprune import config
from kdprune.io import read_json
from kdprune.project import Paths
from kdprune.runner import run_stage
from kdprune.tracking import MlflowTracker, NullTracker
from kdprune.train import Split, evaluate as evaluate_split

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


def _register(project, params) -> dict:
    """Export (the served file is what is scored and registered) and register, as `dvc repro` does after an edit."""
    run_stage("export", params, Paths(project), NullTracker(), CPU)
    return run_stage("register", params, Paths(project), MlflowTracker(), CPU)


def _edit_torch_file(path, edit) -> bytes:
    """Apply `edit` to the dict saved at `path`; return the original bytes (to restore them)."""
    original = path.read_bytes()
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return original


def _zero_head(payload) -> None:
    """The classifier's last layer set to zero: every image gets class 0 (about 10 % right)."""
    *_, weight, bias = payload["state_dict"]
    payload["state_dict"][weight].zero_()
    payload["state_dict"][bias].zero_()


def _alias(client, name: str) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


@pytest.mark.parametrize("tta", [False, True])
def test_registered_model_reproduces_the_tagged_accuracy(project, tta):
    params = config.parse(tiny_params_dict(prune={**tiny_params_dict()["prune"],
                                                  "finetune": {**tiny_params_dict()["prune"]["finetune"], "tta": tta}}))
    result = _register(project, params)
    assert result["promoted"] is True and result["reason"] == "no current champion" and result["tta"] is tta

    from mlflow.tracking import MlflowClient

    name = params.registry.model_name
    version = MlflowClient(mlflow_uri(project)).get_model_version(name, result["version"])
    assert version.tags["tta"] == str(tta)
    tagged = float(version.tags["val_accuracy"])

    # what the evaluation measures: kdprune.train.evaluate with the TTA setting on the pruned model
    from kdprune.checkpoint import load_model

    prepared = torch.load(Paths(project).prepared, weights_only=True)
    model, _ = load_model(Paths(project).model("pruned"))
    measured = evaluate_split(model, Split.from_prepared(prepared, "val", CPU), tta=tta)["accuracy"]
    assert tagged == pytest.approx(measured, abs=1e-4)

    # the registered model (its ONNX file), loaded back by alias, reproduces it on the same images
    served = MlflowTracker().load_registered(f"models:/{name}@champion")
    logits = served(prepared["val_x"].float() / 255)
    assert (logits.argmax(1) == prepared["val_y"]).float().mean().item() == pytest.approx(tagged, abs=1e-4)
    # the pyfunc flavour (what `mlflow models serve` runs) gives the same logits
    import mlflow

    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = np.asarray(pyfunc.predict((prepared["val_x"][:7].float() / 255).numpy())["logits"])
    assert np.allclose(out, logits[:7].numpy(), atol=1e-4)


def test_gate_keeps_the_champion_unless_clearly_beaten(project, tiny_params):
    from mlflow.tracking import MlflowClient

    name, paths = tiny_params.registry.model_name, Paths(project)
    client = MlflowClient(mlflow_uri(project))

    first = _register(project, tiny_params)
    assert first["promoted"] and first["version"] == "1" and _alias(client, name) == "1"

    good = _edit_torch_file(paths.model("pruned"), _zero_head)
    worse = _register(project, tiny_params)
    assert worse["version"] == "2" and not worse["promoted"] and worse["champion_before"] == "1"
    assert worse["gate"]["losses"] > worse["gate"]["wins"] and "not promoted" in worse["reason"]
    paths.model("pruned").write_bytes(good)

    equal = _register(project, tiny_params)  # the same model again: no gain
    assert equal["version"] == "3" and not equal["promoted"] and equal["gate"]["gain"] == 0
    assert _alias(client, name) == "1"

    # a weak champion that carries no val_accuracy tag is scored, not unbeatable
    client.set_registered_model_alias(name, "champion", "2")
    client.delete_model_version_tag(name, "2", "val_accuracy")
    better = _register(project, tiny_params)
    assert better["promoted"] and better["champion_before"] == "2" and _alias(client, name) == "4"
    assert better["gate"]["p_value"] <= 0.05 and better["gate"]["gain"] >= 1
    assert read_json(paths.registration) == better

    # decision and numbers in the run's tags; lineage and gate on the version
    run = client.get_run(client.get_model_version(name, "4").run_id)
    assert run.data.tags["promoted"] == "true" and run.data.tags["promotion"] == better["reason"]
    assert run.data.tags["gate.wins"] == str(better["gate"]["wins"])
    tags = client.get_model_version(name, "4").tags
    assert tags["lineage.dataset_id"] == tags["dataset_id"] and len(tags["lineage.params_sha256"]) == 64
    assert tags["lineage.run.register"] == run.info.run_id and tags["promotion"] == better["reason"]
    assert {"lineage.git_commit", "lineage.git_dirty", "lineage.kdprune_version", "lineage.torch_version"} <= set(tags)
    from kdprune.lineage import code_hash, git_state

    assert tags["lineage.code_sha256"] == code_hash()
    assert tags["lineage.code_git_commit"] == git_state(REPO)["git_commit"]  # the code's checkout, not the project's

    # every run finished; the lock is gone
    assert sorted((r.info.run_name, r.info.status) for r in all_runs(mlflow_uri(project))) == [("register", "FINISHED")] * 4
    assert [m.name for m in client.search_registered_models()] == [name]


def test_champion_from_other_data_is_scored_on_this_data(project, tiny_params):
    from mlflow.tracking import MlflowClient

    name, paths = tiny_params.registry.model_name, Paths(project)
    client = MlflowClient(mlflow_uri(project))
    prepared = _edit_torch_file(paths.prepared, lambda p: p.update(dataset_id="another-dataset"))
    assert _register(project, tiny_params)["promoted"]
    paths.prepared.write_bytes(prepared)

    good = _edit_torch_file(paths.model("pruned"), _zero_head)
    worse = _register(project, tiny_params)  # used to replace any champion from other data, blindly
    assert not worse["promoted"] and "other data" in worse["reason"] and _alias(client, name) == "1"
    assert worse["gate"]["images"] == len(torch.load(paths.prepared, weights_only=True)["val_y"])
    paths.model("pruned").write_bytes(good)


def test_champion_with_other_classes_is_not_replaced_blindly(project, tiny_params):
    from mlflow.tracking import MlflowClient

    name, paths = tiny_params.registry.model_name, Paths(project)
    client = MlflowClient(mlflow_uri(project))
    good = _edit_torch_file(paths.model("pruned"), lambda p: p.update(classes=[f"c{i}" for i in range(10)]))
    assert _register(project, tiny_params)["promoted"]
    paths.model("pruned").write_bytes(good)
    result = _register(project, tiny_params)
    assert not result["promoted"] and "other classes" in result["reason"] and "\n" not in result["reason"]
    assert _alias(client, name) == "1"


def test_lineage_names_the_runs_that_made_the_model(project, tiny_params):
    from mlflow.tracking import MlflowClient

    tracker = MlflowTracker()
    with tracker.run("pipeline") as parent:
        evaluated = run_stage("evaluate", tiny_params, Paths(project), parent, CPU)
        result = run_stage("register", tiny_params, Paths(project), parent, CPU)
    assert evaluated and result["promoted"]
    client = MlflowClient(mlflow_uri(project))
    runs = {r.info.run_name: r.info.run_id for r in all_runs(mlflow_uri(project))}
    tags = client.get_model_version(tiny_params.registry.model_name, result["version"]).tags
    assert tags["lineage.run.evaluate"] == runs["evaluate"] and tags["lineage.run.register"] == runs["register"]
    assert "lineage.run.teacher" not in tags  # made without tracking: no run to name
    # what is registered is the served file: the export stage's ONNX model, answering alike
    from kdprune.export import OrtModel
    from kdprune.tracking import load_registered_model

    images = torch.rand(5, 1, 8, 8)
    registered = load_registered_model(f"models:/{tiny_params.registry.model_name}/{result['version']}")
    assert torch.equal(registered(images), OrtModel(Paths(project).onnx)(images))


@pytest.mark.parametrize("speedup, registered", [(0.85, False), (0.95, True), (1.3, True)])
def test_a_served_model_slower_than_its_parent_is_never_registered(project, speedup, registered):
    """register reads the evaluate report's served speed-up (ONNX Runtime, served file vs distilled ONNX)."""
    from kdprune.io import write_json

    paths = Paths(project)
    report = read_json(paths.report_json)
    report["pruning"].update(served_speedup_b1=1.5, served_speedup_batch=speedup)
    write_json(paths.report_json, report)
    raw = tiny_params_dict(registry={"model_name": "kdprune-test", "alias": "champion", "require_faster": True})
    result = run_stage("register", config.parse(raw), paths, MlflowTracker(), torch.device("cpu"))
    assert (result["version"] is not None) is registered and result["promoted"] is registered
    if not registered:
        assert "slower than the distilled student on ONNX Runtime at batch 8 (0.85x" in result["reason"]
        assert read_json(paths.registration)["promoted"] is False
    # switched off, the slower one is registered too
    off = run_stage("register", config.parse(tiny_params_dict()), paths, MlflowTracker(), torch.device("cpu"))
    assert off["version"] is not None
