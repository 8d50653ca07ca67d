"""Shared fixtures: tiny params, temporary working folders, image trees, MLflow and Prefect pointed at tmp."""

from __future__ import annotations

import atexit
import copy
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

# Telemetry off and every tool's state in temporary folders, before anything imports Prefect, MLflow or DVC.
from kdprune.telemetry import TELEMETRY_OFF  # noqa: E402 - the one definition; importing kdprune is light

os.environ.update(TELEMETRY_OFF)
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="kdprune-tests-"))
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_TMP / 'mlflow-default.db'}"
os.environ["DVC_SITE_CACHE_DIR"] = str(_SESSION_TMP / "dvc-site-cache")
os.environ["DVC_GLOBAL_CONFIG_DIR"] = str(_SESSION_TMP / "dvc-global-config")
os.environ.setdefault("KDPRUNE_DEVICE", "cpu")  # deterministic and small; override to test on a GPU
os.environ.pop("KDPRUNE_TRACKING", None)
# One intra-op thread (here and in the stage subprocesses): the tensors are tiny, and on a busy 2-core machine two
# spinning OpenMP threads per process made a training step of a tiny CNN about 250x slower (1 s instead of 4 ms).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("KDPRUNE_PARENT_RUN_ID", None)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CORE_STAGES = ("prepare", "teacher", "student", "distill", "prune", "export", "evaluate", "register")


def tiny_params_dict(**sections) -> dict:
    """Raw params (what params.yaml holds) with tiny models and 1-2 epochs on digits."""
    train = {"epochs": 2, "batch_size": 64, "optimizer": "nesterov", "lr": 0.05, "momentum": 0.9,
             "weight_decay": 5e-4, "schedule": "linear", "warmup_epochs": 0,
             "augment": {"flip": False, "translate": 0, "cutout": 0}}
    raw = {
        "seed": 0,
        "data": {"source": "digits", "path": None, "image_size": None, "val_fraction": 0.1, "test_fraction": 0.2},
        "teacher": {"model": {"arch": "resnet", "width": 8, "depth": 1, "dropout": 0.0}, "train": dict(train)},
        "student": {"model": {"arch": "resnet", "width": 4, "depth": 1, "dropout": 0.0}, "train": dict(train)},
        "distill": {"temperature": 4.0, "alpha": 0.9},
        "prune": {"target": 0.5, "latency_target": None, "round_to": 1, "finetune": {**train, "epochs": 1, "lr": 0.02}},
        "evaluate": {"latency_batch": 8, "latency_repeats": 2},
        # tiny models time alike pruned or not: the served-speed rule has its own test (test_gate.py)
        "registry": {"model_name": "kdprune-test", "alias": "champion", "require_faster": False},
    }
    for key, value in sections.items():
        raw[key] = value
    return copy.deepcopy(raw)


def deep_update(raw: dict, updates: dict) -> dict:
    """A copy of `raw` with the nested `updates` applied."""
    out = copy.deepcopy(raw)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def write_params(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def tiny_raw() -> dict:
    return tiny_params_dict()


@pytest.fixture
def tiny_params(tiny_raw):
    from kdprune import config

    return config.parse(tiny_raw)


def _mlflow_template() -> Path:
    """An empty MLflow SQLite store, created once per session (its schema migrations take seconds)."""
    template = _SESSION_TMP / "mlflow-template" / "mlflow.db"
    if not template.exists():
        from mlflow.tracking import MlflowClient

        template.parent.mkdir(parents=True, exist_ok=True)
        MlflowClient(f"sqlite:///{template}").search_experiments()
    return template


def fresh_mlflow_store(folder: Path) -> str:
    """A new, empty MLflow store at folder/mlflow.db (a copy of the session's template); returns its URI."""
    shutil.copy2(_mlflow_template(), folder / "mlflow.db")
    return mlflow_uri(folder)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A temporary project folder as the working directory, with an empty MLflow store in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_mlflow_store(tmp_path))
    monkeypatch.delenv("KDPRUNE_TRACKING", raising=False)
    monkeypatch.delenv("KDPRUNE_PARENT_RUN_ID", raising=False)
    return tmp_path


@pytest.fixture
def params_file(workdir, tiny_raw) -> Path:
    return write_params(workdir / "params.yaml", tiny_raw)


def mlflow_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def all_runs(uri: str) -> list:
    """Every run in every experiment of the MLflow store at `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=1000) if ids else []


def leftovers(root: Path) -> list[Path]:
    """Temporary files an interrupted atomic write would leave."""
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def subprocess_env(**extra: str) -> dict:
    """Environment for a `kdprune` / `dvc` subprocess: the venv first on PATH, telemetry off."""
    env = dict(os.environ)
    env.update(TELEMETRY_OFF)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("KDPRUNE_TRACKING", None)
    env.pop("KDPRUNE_PARENT_RUN_ID", None)
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------- images
def pattern_image(index: int, size: tuple[int, int], mode: str) -> "Image.Image":
    """A deterministic image that differs for every `index` (so images can be told apart after loading)."""
    from PIL import Image

    h, w = size
    rng = np.random.default_rng(index)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def make_imagefolder(root: Path, classes=("cat", "dog"), per_class: dict | None = None, size=(8, 8),
                     mode: str = "L", sizes: dict | None = None, modes: dict | None = None,
                     splits=("train", "test")) -> Path:
    """Write root/<split>/<class>/<i>.png; `sizes`/`modes` map (split, class, i) to a per-image size/mode."""
    per_class = per_class or {"train": 6, "test": 3}
    index = 0
    for split in splits:
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class[split]):
                key = (split, cls, i)
                image = pattern_image(index, (sizes or {}).get(key, size), (modes or {}).get(key, mode))
                image.save(folder / f"{i}.png")
                index += 1
    return root


def make_tar(folder: Path, archive: Path, top: str | None = None) -> Path:
    """Pack folder's contents into a .tar.gz, optionally under one top-level folder `top`."""
    with tarfile.open(archive, "w:gz") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=f"{top}/{child.name}" if top else child.name)
    return archive


@pytest.fixture
def imagefolder(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "images")


# ---------------------------------------------------------------------------------- a trained project
@pytest.fixture(scope="session")
def trained_project(tmp_path_factory) -> Path:
    """prepare .. evaluate run once in-process on digits with tiny params (NullTracker); copy it before writing."""
    from kdprune import config
    from kdprune.project import Paths
    from kdprune.runner import run_stage
    from kdprune.tracking import NullTracker
    import torch

    root = tmp_path_factory.mktemp("trained")
    params = config.parse(tiny_params_dict())
    write_params(root / "params.yaml", tiny_params_dict())
    summaries = {}
    for name in CORE_STAGES[:-1]:
        summaries[name] = run_stage(name, params, Paths(root), NullTracker(), torch.device("cpu"))
    (root / "summaries.json").write_text(json.dumps(summaries))
    return root


@pytest.fixture
def project(trained_project, workdir) -> Path:
    """A private copy of the trained project as the working directory."""
    for child in trained_project.iterdir():
        target = workdir / child.name
        if target.exists():
            continue
        if child.is_dir():
            shutil.copytree(child, target)
        else:
            shutil.copy2(child, target)
    return workdir


# ------------------------------------------------------------------------------------- real PostgreSQL
@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL 15 server on 127.0.0.1 (a free port) in a temporary folder, for the whole session."""
    from servers import Postgres, postgres_available

    if not postgres_available():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not on PATH")
    server = Postgres().start()
    yield server
    server.stop()
