"""What the stages, the search and bench/ share, in one module so that none of them imports another:

- `Paths`, the catalog of where every stage reads and writes, and `stage_outputs`, each stage's main output;
- `resolve_device`, the machine's device;
- the params a training stage really uses: params.yaml with the search's best points applied (`effective_params`);
- `new_model` / `train_new`, the one way to seed, build and fit a fresh model (input shape and class count are
  derived from the prepared data here, and only here).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdprune.config import ModelParams, Params, TrainParams
from kdprune.errors import KdpruneError
from kdprune.io import read_json
from kdprune.models import build
from kdprune.train import EpochCallback, Split, fit

ROLES = ("teacher", "student")


@dataclass(frozen=True)
class Paths:
    """Where every stage reads and writes, relative to the project root (the 'catalog')."""

    root: Path = Path(".")

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared.pt"

    def model(self, name: str) -> Path:
        return self.root / "models" / f"{name}.pt"

    def stage_metrics(self, name: str) -> Path:
        return self.root / "metrics" / f"{name}.json"

    def curve(self, name: str) -> Path:
        return self.root / "plots" / f"{name}.csv"

    @property
    def latency_table(self) -> Path:
        """The prune stage's per-layer latency table on its runtime (kept while its key holds)."""
        return self.root / "models" / "latency-table.json"

    @property
    def sensitivity_plot(self) -> Path:
        return self.root / "plots" / "sensitivity.png"

    @property
    def report_json(self) -> Path:
        """The evaluate stage's whole report, timings included: what register and people's scripts read."""
        return self.root / "reports" / "report.json"

    @property
    def metrics_json(self) -> Path:
        """The report without its timings: DVC's metrics, so `dvc metrics diff` shows what changed in the models,
        not the latency noise of models that did not change."""
        return self.root / "reports" / "metrics.json"

    @property
    def report_md(self) -> Path:
        return self.root / "reports" / "table.md"

    @property
    def per_class_json(self) -> Path:
        return self.root / "reports" / "per_class.json"

    @property
    def per_class_md(self) -> Path:
        return self.root / "reports" / "per_class.md"

    @property
    def confusion_png(self) -> Path:
        return self.root / "reports" / "confusion.png"

    @property
    def registration(self) -> Path:
        return self.root / "reports" / "registration.json"

    @property
    def onnx(self) -> Path:
        """The served file: what is registered, served, predicted with and timed in the report."""
        return self.root / "models" / "served.onnx"

    @property
    def float_onnx(self) -> Path:
        """The pruned model exported in float, checked against torch: the served file, or what INT8 came from."""
        return self.root / "models" / "pruned.onnx"

    @property
    def search_dir(self) -> Path:
        return self.root / "search"

    def search_best(self, role: str) -> Path:
        """The best point of one role's study: a DVC dependency of the stages that train that role."""
        return self.search_dir / f"{role}.json"

    def study_db(self, role: str) -> Path:
        """The default (SQLite) storage of one role's study, a DVC out of its search stage."""
        return self.search_dir / f"{role}-study.db"

    @property
    def compare_json(self) -> Path:
        return self.search_dir / "compare.json"


def stage_outputs(paths: Paths) -> dict[str, Path]:
    """The main output of each stage (the file later stages read): the first of its outputs in the stage table."""
    from kdprune.stage_inputs import table

    return {name: paths.root / stage.outputs()[0] for name, stage in table().items()}


def resolve_device(name: str | None = None) -> torch.device:
    """The device flag, else KDPRUNE_DEVICE, else CUDA when present, else the CPU."""
    name = name or os.environ.get("KDPRUNE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------ searched params
# The keys of a searched point that replace a role's training params (the rest: model, distill, prune).
TRAIN_KEYS = ("optimizer", "lr", "momentum", "batch_size", "schedule", "warmup_epochs", "weight_decay",
              "label_smoothing")
AUGMENT_KEYS = ("translate", "cutout")


def apply_point(params: Params, role: str, point: dict[str, Any], fraction: float = 1.0) -> Params:
    """`params` with one role's training (and, for the student, KD and size) replaced by a searched point.

    `fraction` < 1 shrinks the schedule (a search trial): epochs and warm-up scale together, so a trial trains on
    the same lr curve as the real run, compressed in time.
    """
    role_params = getattr(params, role)
    train = role_params.train.model_dump()
    train.update({k: point[k] for k in TRAIN_KEYS if k in point})
    train["augment"] = {**train["augment"], **{k: point[k] for k in AUGMENT_KEYS if k in point}}
    epochs = max(1, round(train["epochs"] * fraction))
    train["warmup_epochs"] = min(train["warmup_epochs"] * epochs / train["epochs"], epochs)
    train["epochs"] = epochs
    model = role_params.model.model_dump()
    model.update({k: point[k] for k in ("dropout", "width") if k in point})
    raw = params.model_dump()
    raw[role] = {"model": model, "train": train}
    if role == "student":
        raw["distill"].update({k: point[k] for k in ("temperature", "alpha") if k in point})
        if "temperature" in point and raw["distill"]["dkd"]["temperature"] is not None:
            raw["distill"]["dkd"]["temperature"] = point["temperature"]  # the temperature DKD actually uses
        if "prune_target" in point:
            raw["prune"]["target"] = point["prune_target"]
    return Params.model_validate(raw)


def load_best(paths: Paths, role: str) -> dict:
    path = paths.search_best(role)
    return read_json(path) if path.is_file() else {"enabled": False}


def searched_params(params: Params, best: dict[str, dict]) -> Params:
    """`params` with each role's best point (best[role], as the search wrote it) applied, if the search is on."""
    if not params.search.enabled:
        return params
    for role in ROLES:
        found = best.get(role, {})
        if found.get("enabled"):
            params = apply_point(params, role, found["point"])
    return params


def effective_params(params: Params, paths: Paths) -> Params:
    """params.yaml with the search's best points applied when `search.enabled` (search/<role>.json are deps).

    A best-point file that is not what the search writes is one error line naming it.
    """
    for role in ROLES:
        try:
            params = searched_params(params, {role: load_best(paths, role)})
        except (KeyError, TypeError, AttributeError, ValueError) as error:  # pydantic's ValidationError is a ValueError
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise KdpruneError(f"{paths.search_best(role)}: not a usable search result ({type(error).__name__}: "
                               f"{reason[:120]}); run the search-{role} stage again") from None
    return params


# ------------------------------------------------------------------------------ seed, build, fit
_INIT_LOCK = threading.Lock()  # thread workers share torch's global RNG: seed-and-build is one critical section


def input_spec(prepared: dict) -> tuple[tuple[int, int, int], int]:
    """(channels, height, width) of one image and the number of classes of the prepared data."""
    return tuple(prepared["train_x"].shape[1:]), len(prepared["classes"])


def new_model(model: ModelParams | dict, prepared: dict, seed: int) -> torch.nn.Module:
    """A freshly initialised model for the prepared data; equal seeds give equal weights (in any thread)."""
    spec = model.model_dump() if isinstance(model, ModelParams) else dict(model)
    (c, size, _), classes = input_spec(prepared)
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(spec, c, size, classes)


def make_splits(prepared: dict, device: torch.device, names: tuple[str, ...] = ("train", "val")) -> list[Split]:
    return [Split.from_prepared(prepared, name, device) for name in names]


def train_new(model: ModelParams | torch.nn.Module, train_params: TrainParams, prepared: dict, train: Split,
              val: Split, *, stage: str, seed: int, teacher: torch.nn.Module | None = None, distill=None,
              on_epoch: EpochCallback | None = None) -> tuple[torch.nn.Module, list[dict]]:
    """Seed, build and fit: the model a stage, a search trial, the comparison or bench/ trains from scratch.

    `model` may also be an already built module (the pruned student); `distill` is only used with a teacher.
    """
    if not isinstance(model, torch.nn.Module):
        model = new_model(model, prepared, seed)
    torch.manual_seed(seed)  # fit seeds its own shuffling and augmentation; dropout draws from the global RNG
    return fit(model, train, val, train_params, stage=stage, seed=seed, teacher=teacher,
               distill=distill if teacher is not None else None, on_epoch=on_epoch)
