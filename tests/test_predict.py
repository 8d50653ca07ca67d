"""`kdprune predict` and `data.read_image`: the preprocessing of training, a model file or a registered model."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_imagefolder, subprocess_env, tiny_params_dict
from kdprune import config, data
from kdprune.checkpoint import load_model
from kdprune.cli import main
from kdprune.serving import with_normalization
from kdprune.project import Paths
from kdprune.runner import run_stage
from kdprune.tracking import MlflowTracker

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------- read_image
def test_read_image_matches_the_prepared_data(tmp_path):
    """Mixed sizes resized with data.image_size: read_image gives the image prepare stored."""
    root = make_imagefolder(tmp_path / "imgs", per_class={"train": 4, "test": 2}, size=(12, 12),
                            sizes={("test", "cat", 0): (20, 16)})
    prepared = data.prepare(config.parse({"data": {"source": "imagefolder", "path": str(root), "image_size": 8}}).data, 0)
    assert torch.equal(data.read_image(root / "test" / "cat" / "0.png", 1, 8), prepared["test_x"][0])
    assert torch.equal(data.read_image(root / "test" / "cat" / "1.png", 1, 8), prepared["test_x"][1])


def test_read_image_converts_channels(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((10, 10), 7, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0], "L").save(tmp_path / "grey.png")
    expected_rgb = torch.from_numpy(rgb).permute(2, 0, 1)
    assert torch.equal(data.read_image(tmp_path / "rgb.png", 3, 10), expected_rgb)
    assert torch.equal(data.read_image(tmp_path / "rgba.png", 3, 10), expected_rgb)  # alpha dropped
    grey = data.read_image(tmp_path / "grey.png", 3, 10)  # grey to an RGB model: the level in every channel
    assert grey.shape == (3, 10, 10) and torch.equal(grey[0], torch.from_numpy(rgb[..., 0])) and torch.equal(grey[0], grey[2])
    luma = data.read_image(tmp_path / "rgb.png", 1, 10)  # RGB to a grey model: luma, as Pillow's "L"
    pil_luma = torch.from_numpy(np.asarray(Image.fromarray(rgb, "RGB").convert("L"))).float()
    assert luma.shape == (1, 10, 10) and (luma[0].float() - pil_luma).abs().max() <= 1
    assert data.read_image(tmp_path / "rgb.png", 3, 4).shape == (3, 4, 4)


# ------------------------------------------------------------------------------------------- predict
def save_test_images(project, count: int = 6) -> tuple[list, torch.Tensor]:
    """The first `count` prepared test images as PNG files (lossless: the model sees the same pixels)."""
    prepared = torch.load(Paths(project).prepared, weights_only=True)
    folder = project / "images"
    folder.mkdir()
    files = []
    for i in range(count):
        files.append(folder / f"{i:02d}.png")
        Image.fromarray(prepared["test_x"][i, 0].numpy(), "L").save(files[-1])
    return files, prepared["test_x"][:count]


def expected_lines(project, files, images) -> list[str]:
    model, payload = load_model(Paths(project).model("pruned"))
    served = with_normalization(model, payload["extra"]["mean"], payload["extra"]["std"])
    with torch.inference_mode():
        probs = served(images.float().div(255)).softmax(1)
    return [f"{f}\t{payload['classes'][int(p.argmax())]}\t{float(p.max()):.4f}" for f, p in zip(files, probs)]


def test_predict_a_model_file_through_the_executable(project):
    files, images = save_test_images(project)
    done = subprocess.run([sys.executable, "-m", "kdprune", "predict", "--model", "models/pruned.pt", "images"],
                          cwd=project, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    relative = [f.relative_to(project) for f in files]
    assert done.stdout.splitlines() == expected_lines(project, relative, images)


def test_predict_the_registered_champion_by_default(project, capsys):
    """With no --model, params' models:/NAME@ALIAS, loaded through MLflow, answers as the model file does."""
    params = config.parse(tiny_params_dict())
    run_stage("register", params, Paths(project), MlflowTracker(), CPU)
    files, images = save_test_images(project, 3)
    assert main(["predict", *map(str, files)]) == 0
    from_registry = capsys.readouterr().out.splitlines()
    assert main(["predict", "--model", "models/pruned.pt", *map(str, files)]) == 0
    assert from_registry == capsys.readouterr().out.splitlines() == expected_lines(project, files, images)
    assert main(["predict", "--model", "models:/kdprune-test/1", str(files[0])]) == 0
    assert capsys.readouterr().out.splitlines() == from_registry[:1]


def listing(root) -> dict:
    return {p: p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case, message", [
    ("no-model", r"models:/nothing@champion: no registered model 'nothing'"),
    ("no-alias", r"models:/kdprune-test@nope: registered model 'kdprune-test' has no alias 'nope'"),
    ("no-store", r"models:/kdprune-test@champion: no MLflow store at sqlite:///.*absent\.db"),
    ("undecodable", r"images/broken\.png: unreadable image"),
    ("empty-folder", r"empty: no image files in this folder"),
    ("missing-file", r"images/absent\.png: no such image file or folder"),
    ("missing-model-file", r"models/absent\.pt: model file not found"),
])
def test_predict_bad_input_is_one_line_and_writes_nothing(project, capsys, monkeypatch, case, message):
    params = config.parse(tiny_params_dict())
    if case in ("no-alias", "no-store"):
        run_stage("register", params, Paths(project), MlflowTracker(), CPU)
    files, _ = save_test_images(project, 2)
    (project / "images" / "broken.png").write_bytes(b"not an image")
    (project / "empty").mkdir()
    args = {
        "no-model": ["--model", "models:/nothing@champion", "images/00.png"],
        "no-alias": ["-S", "registry.alias=nope", "images/00.png"],
        "no-store": ["images/00.png"],
        "undecodable": ["--model", "models/pruned.pt", "images"],
        "empty-folder": ["--model", "models/pruned.pt", "images/00.png", "empty"],
        "missing-file": ["--model", "models/pruned.pt", "images/absent.png"],
        "missing-model-file": ["--model", "models/absent.pt", "images/00.png"],
    }[case]
    if case == "no-store":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'absent.db'}")
    capsys.readouterr()
    before = listing(project)
    assert main(["predict", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert listing(project) == before


def test_the_default_champion_must_fit_the_projects_data(project, tmp_path, capsys):
    """The project now prepares other images (3 classes, 8x8 RGB): the digits champion is refused in one line,
    not asked to name them; --model still answers."""
    params = config.parse(tiny_params_dict())
    run_stage("register", params, Paths(project), MlflowTracker(), CPU)
    files, _ = save_test_images(project, 2)
    images = make_imagefolder(tmp_path / "shapes", classes=("ring", "square", "star"), mode="RGB",
                              per_class={"train": 6, "test": 2})
    other = data.prepare(config.DataParams(source="imagefolder", path=str(images), val_fraction=0.2), seed=0)
    data.save_prepared(other, Paths(project).prepared)
    capsys.readouterr()
    assert main(["predict", str(files[0])]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert "models:/kdprune-test@champion: trained for 10 classes (0, 1, 2, 3, 4, ...) at 1x8x8" in err
    assert "has 3 (ring, square, star) at 3x8x8: not a model for these images" in err
    assert main(["predict", "--model", "models:/kdprune-test@champion", str(files[0])]) == 0
