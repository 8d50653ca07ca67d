"""The one stage-input table (kdprune/stage_inputs.py): dvc.yaml is written from it, resume fingerprints it, the
search stages' params are what their trials read, and a change outside the project (data, code) is seen."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, deep_update, make_imagefolder, pattern_image, tiny_params_dict
from kdprune import config, resume, search as search_mod
from kdprune.project import Paths, stage_outputs
from kdprune.stage_inputs import dvc_yaml, table
from kdprune.stage_names import STAGE_NAMES

CPU = torch.device("cpu")


def test_dvc_yaml_is_the_table():
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(), "run `python -m kdprune.stage_inputs` after editing the table"
    stages = yaml.safe_load(dvc_yaml())["stages"]
    assert tuple(stages) == tuple(table()) == STAGE_NAMES
    for name, stage in table().items():
        listed = [next(iter(o)) if isinstance(o, dict) else o
                  for key in ("outs", "metrics", "plots") for o in stages[name].get(key, [])]
        assert listed == stage.outputs() and stages[name]["params"] == list(stage.params)
        assert stages[name]["deps"] == list(stage.deps) and stages[name]["cmd"] == f"kdprune stage {name}"


def test_main_outputs_come_from_the_table(tmp_path):
    paths = Paths(tmp_path)
    assert stage_outputs(paths) == {
        "prepare": paths.prepared, "search-teacher": paths.search_best("teacher"), "teacher": paths.model("teacher"),
        "search-student": paths.search_best("student"), "student": paths.model("student"),
        "distill": paths.model("distilled"), "compare": paths.compare_json, "prune": paths.model("pruned"),
        "export": paths.onnx, "evaluate": paths.report_json, "register": paths.registration}


def _flat_keys(raw: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in raw.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _flat_keys(value, f"{prefix}{key}.")
    return keys


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_study_identity_and_dvc_params_come_from_one_list(role):
    """dvc.yaml's search params = the budget + every key a trial can read; each configuration's identity reads a
    subset of them, and together the configurations read all of them."""
    listed = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][f"search-{role}"]["params"])
    assert listed == set(search_mod.BUDGET_KEYS[role]) | set(search_mod.trial_keys(role))
    seen = set()
    for method, mode in itertools.product(("hinton", "dkd", "fitnets"), ("single", "pareto")):
        params = config.parse(tiny_params_dict(distill={"method": method}, search={"mode": mode}))
        inputs = search_mod.trial_inputs(params, role, "data-id", "teacher-hash" if role == "student" else None)
        assert set(inputs["params"]) <= listed - set(search_mod.BUDGET_KEYS[role]), (method, mode)
        seen |= set(inputs["params"])
    assert seen == listed - set(search_mod.BUDGET_KEYS[role])
    # every key is a real param, and DKD's study does not read alpha while Hinton's does
    every = _flat_keys(config.parse(tiny_params_dict()).model_dump())
    assert listed <= every
    if role == "student":
        dkd = config.parse(tiny_params_dict(distill={"method": "dkd"}))
        hinton = config.parse(tiny_params_dict(distill={"method": "hinton"}))
        assert "search.space.alpha" not in search_mod.trial_inputs(dkd, role, "d", "t")["params"]
        assert "search.space.alpha" in search_mod.trial_inputs(hinton, role, "d", "t")["params"]


# ------------------------------------------------------------------------------ resume outside the project
def _run_all(params, paths: Paths, capsys) -> set[str]:
    """Every stage in order with resume; the stages that ran (were not skipped)."""
    from kdprune.runner import run_stage
    from kdprune.tracking import NullTracker

    capsys.readouterr()
    for name in STAGE_NAMES:
        run_stage(name, params, paths, NullTracker(), CPU, resume=True)
    out = capsys.readouterr().out
    return {name for name in STAGE_NAMES if f"{name}: skipped" not in out}


def _stale(params, root: Path) -> set[str]:
    extra = {"register": {"tracking": None}}  # the registry it went to (none: NullTracker), as run_stage records
    return {name for name in STAGE_NAMES if resume.completed(root, name, params, extra.get(name)) is None}


@pytest.mark.slow
def test_resume_sees_an_outside_image_folder_the_installed_code_and_each_param(tmp_path, monkeypatch, capsys):
    images = make_imagefolder(tmp_path / "outside" / "images", classes=("a", "b", "c"),
                              per_class={"train": 12, "test": 4})
    code = tmp_path / "installed"  # the code's checkout, apart from the project (as after `pip install`)
    shutil.copytree(REPO / "kdprune", code / "kdprune", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(resume, "CODE_ROOT", code)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    raw = tiny_params_dict(data={"source": "imagefolder", "path": str(images), "val_fraction": 0.2})
    params = config.parse(raw)
    paths = Paths(project)

    assert _run_all(params, paths, capsys) == set(STAGE_NAMES)
    assert _run_all(params, paths, capsys) == set()  # nothing changed: nothing runs

    # an image changed in the folder outside the project: prepare, then everything that reads its output
    pattern_image(999, (8, 8), "L").save(images / "train" / "a" / "0.png")
    assert _stale(params, project) == {"prepare"}
    assert _run_all(params, paths, capsys) == set(STAGE_NAMES)

    # a code file of the installed package: every stage runs the package; the searches only some of its modules
    report = code / "kdprune" / "report.py"
    report.write_text(report.read_text() + "\n# an edit\n")
    assert _stale(params, project) == set(STAGE_NAMES) - {"search-teacher", "search-student"}
    (code / "kdprune" / "optim.py").write_text((code / "kdprune" / "optim.py").read_text() + "\n# an edit\n")
    assert _stale(params, project) == set(STAGE_NAMES)
    assert _run_all(params, paths, capsys) == set(STAGE_NAMES)

    # a param: exactly the stages that list it, then those that read their outputs
    registry = config.parse(deep_update(raw, {"registry": {"min_gain": 2}}))
    assert _stale(registry, project) == {"register"}
    assert _run_all(registry, paths, capsys) == {"register"}
    repeats = config.parse(deep_update(raw, {"registry": {"min_gain": 2},
                                             "evaluate": {"latency_repeats": 3}}))
    assert _stale(repeats, project) == {"export", "evaluate"}
    ran = _run_all(repeats, paths, capsys)
    assert {"export", "evaluate"} <= ran <= {"export", "evaluate", "register"}  # register: if the report changed
