"""Helpers and fixtures for the search-stage tests: tiny search params, a prepared digits project, trial setups."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import deep_update, tiny_params_dict
from kdprune.telemetry import TELEMETRY_OFF

# Telemetry off, no progress bars; Prefect's home in a temporary folder (conftest sets one first when loaded).
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="kdprune-search-prefect-"))
os.environ.update({**TELEMETRY_OFF, "CI": "1"})

# A small space: every point trains in about a second on digits with the tiny models.
SMALL_SPACE = {
    "optimizer": ["nesterov", "adamw"],
    "lr": {"low": 0.01, "high": 0.2, "log": True},
    "batch_size": [64, 128],
    "translate": {"low": 0, "high": 1},
}

# Every key `kdprune.search.suggest` samples (teacher role): a complete point to enqueue.
GOOD_POINT = {"optimizer": "nesterov", "lr": 0.05, "momentum": 0.9, "batch_size": 64, "schedule": "linear",
              "warmup_epochs": 0.0, "weight_decay": 5e-4, "label_smoothing": 0.0, "translate": 0, "cutout": 0,
              "dropout": 0.0}


def search_raw(search: dict | None = None, **sections) -> dict:
    """Tiny params (1 training epoch) with the search switched on over SMALL_SPACE; `search` updates that section."""
    raw = tiny_params_dict(**sections)
    for role in ("teacher", "student"):
        raw[role]["train"]["epochs"] = 1
    raw["search"] = deep_update({"enabled": True, "n_trials": 2, "fraction": 1.0, "workers": 1,
                                 "runner": "threads", "seed": 0, "space": SMALL_SPACE}, search or {})
    return raw


def search_params(search: dict | None = None, **sections):
    from kdprune import config

    return config.parse(search_raw(search, **sections))


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory) -> Path:
    """digits prepared once (the prepare stage's own code) for the whole session; copy it before use."""
    from kdprune import config, data as data_mod

    path = tmp_path_factory.mktemp("prepared") / "prepared.pt"
    params = config.parse(tiny_params_dict())
    data_mod.save_prepared(data_mod.prepare(params.data, params.seed), path)
    return path


@pytest.fixture
def search_root(tmp_path, prepared_digits) -> Path:
    """A project folder holding data/prepared.pt."""
    (tmp_path / "data").mkdir()
    shutil.copy2(prepared_digits, tmp_path / "data" / "prepared.pt")
    return tmp_path


def dataset_id(root: Path) -> str:
    from kdprune import data as data_mod

    return data_mod.load_prepared(root / "data" / "prepared.pt")["dataset_id"]


def trial_setup(params, root: Path, role: str = "teacher", tracker=None, name: str | None = None):
    """A teacher TrialSetup on the project's default storage (search/teacher-study.db), named as the search names it."""
    from kdprune.project import Paths
    from kdprune.search import TrialSetup, storage_url, study_name
    from kdprune.tracking import NullTracker

    paths = Paths(root)
    paths.search_dir.mkdir(exist_ok=True)
    return TrialSetup(params=params, role=role, study_name=name or study_name(params, role, dataset_id(root)),
                      storage=storage_url(params.search, paths, role), prepared_path=paths.prepared, teacher_path=None,
                      device="cpu", tracker=tracker or NullTracker())


def load_trials(setup) -> list:
    import optuna

    return optuna.load_study(study_name=setup.study_name, storage=setup.storage).trials
