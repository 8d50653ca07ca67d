"""params.yaml -> validated, frozen Params; every problem is one KdpruneError line naming the field."""

from __future__ import annotations

import pydantic
import pytest
import yaml

from conftest import REPO, deep_update, tiny_params_dict, write_params
from kdprune import config
from kdprune.errors import KdpruneError
from kdprune.models import MODEL_BUILDERS


def test_shipped_params_yaml_is_valid():
    params = config.load(REPO / "params.yaml")
    assert params.data.source == "digits"
    # the schedule is repeated (no anchors): the student trains on the teacher's schedule
    assert params.student.train == params.teacher.train
    assert params.prune.finetune.batch_size == params.teacher.train.batch_size
    assert 0 < params.prune.target < 1


def test_parse_tiny_params(tiny_raw):
    params = config.parse(tiny_raw)
    assert params.teacher.model.width == 8
    assert params.student.model.width == 4
    assert params.prune.finetune.epochs == 1
    assert params.teacher.train.augment.flip is False


def test_params_are_frozen(tiny_params):
    with pytest.raises(pydantic.ValidationError):
        tiny_params.seed = 3


@pytest.mark.parametrize("text", ["", "\n# comments only\n"])
def test_empty_file_is_an_error_not_silent_defaults(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(KdpruneError, match="params.yaml: params file is empty"):
        config.load(path)


def test_overrides_apply_yaml_values(tmp_path, tiny_raw):
    path = write_params(tmp_path / "params.yaml", tiny_raw)
    params = config.load(path, ["distill.temperature=2", "teacher.model.arch=fastnet", "data.image_size=16"])
    assert params.distill.temperature == 2.0
    assert params.teacher.model.arch == "fastnet"
    assert params.data.image_size == 16
    # the file itself is untouched
    assert config.load(path).distill.temperature == tiny_raw["distill"]["temperature"]


@pytest.mark.parametrize("path", [REPO / "params.yaml", *sorted((REPO / "profiles").glob("*.yaml"))],
                         ids=lambda p: p.name)
def test_shipped_params_have_no_anchors_or_merge_keys(path):
    # `dvc exp run -S` rewrites params.yaml and expands anchors and `<<` merges into copies, which then drift apart
    events = list(yaml.parse(path.read_text()))
    assert not [e for e in events if isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None)]
    assert "<<" not in [e.value for e in events if isinstance(e, yaml.ScalarEvent)]


@pytest.mark.parametrize("path", [REPO / "params.yaml", *sorted((REPO / "profiles").glob("*.yaml"))],
                         ids=lambda p: p.name)
def test_dvc_set_param_changes_only_the_key_it_sets(tmp_path, path):
    # the code behind `dvc exp run -S` (DVC's YAML round trip), on a copy of each shipped params file
    from dvc.utils.hydra import apply_overrides as dvc_set

    copy = tmp_path / "params.yaml"
    copy.write_text(path.read_text())
    dvc_set(copy, ["distill.temperature=2.5"])
    before, after = path.read_text().splitlines(), copy.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1, changed
    assert changed[0][1].split("#")[0].split() == ["temperature:", "2.5"]
    assert config.load(copy).distill.temperature == 2.5


def test_override_of_one_section_leaves_an_anchored_twin_alone(tmp_path):
    # a params file written by hand with an anchor: teacher and student load as one shared dict
    path = tmp_path / "params.yaml"
    path.write_text("teacher:\n  train: &schedule {epochs: 8, lr: 0.05}\nstudent:\n  train: *schedule\n")
    params = config.load(path, ["student.train.epochs=3"])
    assert params.student.train.epochs == 3
    assert params.teacher.train.epochs == 8
    assert config.apply_overrides(yaml.safe_load(path.read_text()), ["student.train.lr=0.1"])["teacher"]["train"]["lr"] == 0.05


@pytest.mark.parametrize("override", ["distill.temperature", "=3"])
def test_malformed_override(tmp_path, tiny_raw, override):
    path = write_params(tmp_path / "params.yaml", tiny_raw)
    with pytest.raises(KdpruneError, match="key=value"):
        config.load(path, [override])


def test_override_through_a_value_is_an_error(tmp_path, tiny_raw):
    path = write_params(tmp_path / "params.yaml", tiny_raw)
    with pytest.raises(KdpruneError, match="seed"):
        config.load(path, ["seed.x=1"])


def test_missing_params_file(tmp_path):
    with pytest.raises(KdpruneError, match="params file not found") as info:
        config.load(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: [1, 2\n")
    with pytest.raises(KdpruneError, match="not valid YAML") as info:
        config.load(path)
    assert "\n" not in str(info.value)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(KdpruneError, match="expected a mapping"):
        config.load(path)


# (updates to the tiny params, substrings the one-line message must contain)
BAD = {
    "misspelled top-level key": ({"sead": 1}, ["unknown key 'sead'", "did you mean 'seed'"]),
    "misspelled nested key": ({"distill": {"temprature": 2.0}},
                              ["unknown key 'distill.temprature'", "did you mean 'distill.temperature'"]),
    "misspelled deep key": ({"teacher": {"train": {"epoch": 2}}},
                            ["teacher.train.epoch", "did you mean 'teacher.train.epochs'"]),
    "misspelled finetune key": ({"prune": {"finetune": {"lrr": 0.1}}}, ["prune.finetune.lrr", "prune.finetune.lr"]),
    "wrong type": ({"teacher": {"train": {"epochs": "ten"}}}, ["teacher.train.epochs", "integer", "'ten'"]),
    "epochs < 1": ({"student": {"train": {"epochs": 0}}}, ["student.train.epochs", "greater than or equal to 1"]),
    "finetune epochs < 1": ({"prune": {"finetune": {"epochs": 0}}}, ["prune.finetune.epochs"]),
    "lr = 0": ({"teacher": {"train": {"lr": 0}}}, ["teacher.train.lr", "greater than 0"]),
    "lr < 0": ({"student": {"train": {"lr": -0.1}}}, ["student.train.lr", "greater than 0"]),
    "prune target 0": ({"prune": {"target": 0}}, ["prune.target"]),
    "prune target 1": ({"prune": {"target": 1}}, ["prune.target"]),
    "prune target > 1": ({"prune": {"target": 1.5}}, ["prune.target"]),
    "negative prune target": ({"prune": {"target": -0.2}}, ["prune.target"]),
    "unknown arch": ({"teacher": {"model": {"arch": "vgg"}}}, ["teacher.model", "'vgg'", *MODEL_BUILDERS]),
    "unknown data source": ({"data": {"source": "mnist"}}, ["data.source", "'mnist'", "digits"]),
    "imagefolder without path": ({"data": {"source": "imagefolder", "path": None}}, ["data.path"]),
    "warmup longer than training": ({"teacher": {"train": {"warmup_epochs": 5}}}, ["teacher", "warmup_epochs"]),
    "section is not a mapping": ({"distill": 3}, ["distill"]),
    "unknown distill method": ({"distill": {"method": "crd"}}, ["distill.method", "'crd'", "hinton", "dkd", "fitnets"]),
    "negative dkd beta": ({"distill": {"dkd": {"beta": -1}}}, ["distill.dkd.beta", "greater than or equal to 0"]),
    "misspelled hint key": ({"distill": {"hint": {"layer": 2}}}, ["unknown key 'distill.hint.layer'"]),
    "hint stage not an integer": ({"distill": {"hint": {"stage": "last"}}}, ["distill.hint.stage", "'last'"]),
}


@pytest.mark.parametrize("updates, expected", list(BAD.values()), ids=list(BAD))
def test_bad_params_one_line_naming_the_field(tmp_path, updates, expected):
    path = write_params(tmp_path / "params.yaml", deep_update(tiny_params_dict(), updates))
    with pytest.raises(KdpruneError) as info:
        config.load(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    for part in expected:
        assert part in message


def test_unknown_key_far_from_any_field_has_no_suggestion(tmp_path):
    path = write_params(tmp_path / "params.yaml", deep_update(tiny_params_dict(), {"zzzzzz": 1}))
    with pytest.raises(KdpruneError, match="unknown key 'zzzzzz'") as info:
        config.load(path)
    assert "did you mean" not in str(info.value)


def test_prune_sensitivity_targets_must_be_fractions():

    with pytest.raises(KdpruneError, match="prune.sensitivity") as info:
        config.parse(deep_update(tiny_params_dict(), {"prune": {"sensitivity": [0.5, 1.2]}}))
    assert "\n" not in str(info.value)
    with pytest.raises(KdpruneError, match="prune.method"):
        config.parse(deep_update(tiny_params_dict(), {"prune": {"method": "random"}}))


def test_a_learning_rate_float32_weights_cannot_take_is_refused_naming_the_field():
    with pytest.raises(KdpruneError, match=r"teacher.train.lr"):
        config.parse({"teacher": {"train": {"lr": 1e39}}})


@pytest.mark.parametrize("cron", ["every day", "61 3 * * *", "0 3 * *"])
def test_a_bad_cron_is_one_line_naming_the_field(cron):
    with pytest.raises(KdpruneError, match=r"serve.cron: .*not a cron expression") as info:
        config.parse({"serve": {"cron": cron}})
    assert "\n" not in str(info.value)
    assert config.parse({"serve": {"cron": "*/15 2-4 * * 1-5"}}).serve.cron == "*/15 2-4 * * 1-5"


@pytest.mark.parametrize("data, name", [
    ({}, "kdprune-digits"),
    ({"source": "cifar10"}, "kdprune-cifar10"),
    ({"source": "imagefolder", "path": "/data/My Pets.tar.gz"}, "kdprune-My-Pets"),
    ({"source": "imagefolder", "path": "shots/"}, "kdprune-shots"),
])
def test_the_registry_name_comes_from_the_data_unless_set(data, name):
    assert config.parse({"data": data}).registry.model_name == name
    assert config.parse({"data": data, "registry": {"model_name": None}}).registry.model_name == name
    assert config.parse({"data": data, "registry": {"model_name": "mine"}}).registry.model_name == "mine"


def test_switching_the_shipped_params_to_an_image_folder_changes_the_registry_name(tmp_path):
    params = config.load(REPO / "params.yaml", ["data.source=imagefolder", f"data.path={tmp_path / 'cats'}"])
    assert params.registry.model_name == "kdprune-cats"
    assert config.load(REPO / "params.yaml").registry.model_name == "kdprune-digits"
