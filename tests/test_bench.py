"""bench/bench.py: the limited-data sweep's budgets and table; end to end on a tiny image tree (slow)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from conftest import REPO, make_imagefolder, make_tar

spec = importlib.util.spec_from_file_location("kdprune_bench", REPO / "bench" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture
def quick_raw(tmp_path):
    raw, _ = bench.load_profile(REPO / "profiles" / "cifar10-cpu-quick.yaml", tmp_path / "data.tar.gz")
    return raw


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_every_fraction_trains_for_the_same_steps(quick_raw, fraction):
    full = bench.sweep_params(quick_raw, 0, 1.0, 5000)
    part = bench.sweep_params(quick_raw, 0, fraction, 5000)
    assert part.data.max_train == round(fraction * 5000)
    for role in ("teacher", "student"):
        f, p = getattr(full, role).train, getattr(part, role).train
        steps = lambda n, t: (n // t.batch_size) * t.epochs  # noqa: E731 - fit drops the last partial batch
        assert steps(part.data.max_train, p) == pytest.approx(steps(5000, f), rel=0.05)
        assert p.warmup_epochs / p.epochs == pytest.approx(f.warmup_epochs / f.epochs, rel=0.05)


def test_sweep_epochs_override_and_seed(quick_raw):
    params = bench.sweep_params(quick_raw, 2, 1.0, 5000, epochs=3)
    assert params.seed == 2
    assert params.teacher.train.epochs == params.student.train.epochs == 3
    assert params.teacher.train.warmup_epochs == pytest.approx(1.5 * 3 / 6)  # the profile's 1.5 of 6, scaled
    assert params.data.val_fraction == 0.002


def test_set_overrides_reach_the_sweep(tmp_path):
    raw, params = bench.load_profile(REPO / "profiles" / "cifar10-cpu-quick.yaml", tmp_path / "data.tar.gz",
                                     ["distill.alpha=0.25", "distill.dkd.beta=2"])
    assert (params.distill.alpha, params.distill.dkd.beta) == (0.25, 2)
    swept = bench.sweep_params(raw, 0, 0.1, 5000)
    assert (swept.distill.alpha, swept.distill.dkd.beta) == (0.25, 2)
    assert bench.parse_args(["-S", "a.b=1", "--set", "c=2"]).set == ["a.b=1", "c=2"]


def test_a_bad_set_value_is_one_line_and_exit_2(tmp_path, capsys):
    data = tmp_path / "data.tar.gz"
    data.write_bytes(b"")  # exists: the value is checked before any data is read
    assert bench.main(["--data", str(data), "-S", "distill.alpha=7", "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distill.alpha" in err[0] and err[0].startswith("bench: ")
    assert not (tmp_path / "b.json").exists()


def test_sweep_table_means_spreads_and_paired_gains():
    rows = [{"seed": s, "fraction": 0.1, "train_images": 500, "model": m, "test_accuracy": acc}
            for s, accs in ((0, {"teacher": 0.6, "student": 0.30, "dkd": 0.34}), (1, {"teacher": 0.7, "student": 0.40, "dkd": 0.42}))
            for m, acc in accs.items()]
    lines = bench.sweep_table(rows, ["teacher", "student", "dkd"]).splitlines()
    assert lines[2] == "| 0.1 | 500 | teacher | 65.00 +- 7.07 |  | 2 |"
    assert lines[3] == "| 0.1 | 500 | student | 35.00 +- 7.07 |  | 2 |"
    assert lines[4] == "| 0.1 | 500 | dkd | 38.00 +- 5.66 | 3.00 +- 1.41 | 2 |"  # gains 4 and 2 points


@pytest.fixture
def tiny_profile(tmp_path):
    """Three classes of 8x8 images (DKD needs two non-target classes) and tiny resnets for one epoch."""
    archive = make_tar(make_imagefolder(tmp_path / "images", classes=("a", "b", "c"), per_class={"train": 12, "test": 4},
                                        mode="RGB"), tmp_path / "images.tar.gz")
    train = {"epochs": 1, "batch_size": 8, "lr": 0.05, "warmup_epochs": 0, "augment": {"flip": True, "translate": 1}}
    raw = {"data": {"val_fraction": 0.2, "max_train": 24},
           "teacher": {"model": {"arch": "resnet", "width": 4}, "train": train},
           "student": {"model": {"arch": "resnet", "width": 2}, "train": train},
           "prune": {"finetune": {**train, "epochs": 1}}, "evaluate": {"latency_batch": 4, "latency_repeats": 1}}
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(raw))
    return archive, profile


@pytest.mark.slow
def test_sweep_end_to_end(tiny_profile, tmp_path):
    archive, profile = tiny_profile
    out = tmp_path / "sweep.json"
    assert bench.main(["--data", str(archive), "--profile", str(profile), "--device", "cpu", "--train-fraction",
                       "0.5", "1", "--seeds", "0", "1", "--methods", "hinton", "dkd", "fitnets", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 5  # seeds x fractions x (teacher, student, three methods)
    assert {r["train_images"] for r in rows if r["fraction"] == 0.5} == {12}
    assert {r["epochs"] for r in rows if r["fraction"] == 0.5} == {3}  # 12 // 8 = 1 step per epoch instead of 3
    assert [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()] == rows


@pytest.mark.slow
def test_seed_recipe_and_dataloader_rows(tiny_profile, tmp_path):
    archive, profile = tiny_profile
    out = tmp_path / "bench.json"
    assert bench.main(["--data", str(archive), "--profile", str(profile), "--device", "cpu", "--quick",
                       "--recipes", "seed", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["recipe"], r["model"]): r for r in result["rows"]}
    assert set(rows) == {("seed", "teacher"), ("seed", "student"), ("seed", "distilled"),
                         ("seed+DataLoader", "teacher"), ("seed+DataLoader", "student")}
    assert rows[("seed", "teacher")]["params"] == rows[("seed+DataLoader", "teacher")]["params"]
    for model in ("teacher", "student"):
        assert rows[("seed", model)]["images_per_second"] > 0 and rows[("seed+DataLoader", model)]["images_per_second"] > 0
        assert result["summary"][f"data_path_speedup_{model}"] == pytest.approx(
            rows[("seed", model)]["images_per_second"] / rows[("seed+DataLoader", model)]["images_per_second"])


def test_a_kd_variant_names_its_method_and_mix():
    assert bench.kd_overrides("dkd") == ["distill.method=dkd", "distill.mix=none"]
    assert bench.kd_overrides("hinton+cutmix") == ["distill.method=hinton", "distill.mix=cutmix"]
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="'hinton\\+blur'"):
        bench.kd_variant("hinton+blur")
