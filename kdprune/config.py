"""Typed, validated parameters: params.yaml is read once here and becomes frozen objects.

Machine facts (device, tracking URI) are not parameters; they come from the environment or CLI flags.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdprune.errors import KdpruneError
from kdprune.models import MODEL_BUILDERS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Strict):
    source: Literal["digits", "cifar10", "imagefolder"] = "digits"
    # imagefolder: a folder or .tar/.tar.gz holding train/<class>/ and test/<class>/.
    # cifar10: the cache folder for the download (default: data/cache).
    path: str | None = None
    # Resize every image to this square size (pixels); needed when the images differ in size.
    image_size: int | None = Field(default=None, ge=4, le=1024)
    val_fraction: float = Field(default=0.1, gt=0, lt=1)  # carved from train with `seed`
    # digits, and an image folder with train/ only: the share of the images that becomes the test split
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    # Keep a seeded random subset of at most this many train / test images (quick runs); null = all of them.
    max_train: int | None = Field(default=None, ge=1)
    max_test: int | None = Field(default=None, ge=1)
    # Refuse an image file larger than this many pixels (width x height, read from its header before decoding):
    # a small compressed file can decode to gigabytes. Decoding holds about threads x 3 x this many bytes at most.
    max_pixels: int = Field(default=40_000_000, ge=1)

    @model_validator(mode="after")
    def _path_needed(self) -> DataParams:
        if self.source == "imagefolder" and not self.path:
            raise ValueError("data.path: imagefolder needs a folder or .tar/.tar.gz archive")
        return self


class ModelParams(Strict):
    arch: str = "resnet"
    width: int = Field(default=16, ge=1, le=1024)  # channels of the first stage
    depth: int = Field(default=1, ge=1, le=16)  # residual blocks per stage
    dropout: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _known_arch(self) -> ModelParams:
        if self.arch not in MODEL_BUILDERS:
            raise ValueError(f"unknown model {self.arch!r}; choose one of {sorted(MODEL_BUILDERS)}")
        return self


class AugmentParams(Strict):
    flip: bool = True  # random horizontal flip
    translate: int = Field(default=0, ge=0, le=16)  # random shift up to this many pixels (reflect padding)
    cutout: int = Field(default=0, ge=0, le=64)  # side of a zeroed square, 0 = off


class TrainParams(Strict):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=128, ge=1)
    optimizer: Literal["sgd", "nesterov", "adamw", "hypergrad"] = "nesterov"
    lr: float = Field(default=0.05, gt=0, le=1e30)  # peak learning rate (float32 weights overflow far below 1e38)
    momentum: float = Field(default=0.9, ge=0, lt=1)  # SGD momentum, or AdamW beta1
    beta2: float = Field(default=0.999, gt=0, lt=1)  # AdamW only
    weight_decay: float = Field(default=5e-4, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "linear"  # decay after warm-up
    warmup_epochs: float = Field(default=1.0, ge=0)
    hypergrad_lr: float = Field(default=1e-4, gt=0)  # step size of the learning rate itself (hypergrad only)
    norm_lr_scale: float = Field(default=1.0, gt=0)  # lr multiplier for batch-norm parameters (airbench: 64)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    ema: float | None = Field(default=None, gt=0, lt=1)  # weight-average decay per step; None = off
    augment: AugmentParams = AugmentParams()
    tta: bool = False  # evaluate on image + flipped image
    compile: bool = False  # torch.compile the model (GPU)

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainParams:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        return self


class RoleParams(Strict):
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()


class DKDParams(Strict):
    """Decoupled KD (Zhao et al., CVPR 2022): loss = CE + ramp * T^2 * (alpha * TCKD + beta * NCKD)."""

    alpha: float = Field(default=1.0, ge=0)  # weight of the target-class term (TCKD)
    beta: float = Field(default=8.0, ge=0)  # weight of the non-target-class term (NCKD); the paper: 8 on CIFAR-100
    warmup_epochs: float = Field(default=1.0, ge=0)  # DKD's weight ramps linearly from 0 over these epochs
    # DKD's own temperature (the paper: 4 on CIFAR); empty = distill.temperature. DKD and Hinton's loss often want
    # different ones: DKD's non-target term needs a softer teacher than Hinton's whole distribution.
    temperature: float | None = Field(default=None, gt=0)


class HintParams(Strict):
    """FitNets (Romero et al., ICLR 2015): loss = Hinton's KD loss + weight * MSE(adapter(student stage), teacher stage)."""

    # Which feature map of each network: an index into the model's stages (model.stages), negative from the deepest.
    stage: int = -1
    weight: float = Field(default=1.0, ge=0)  # of the hint term
    # The adapter's own learning rate, as a multiple of the student's (it starts from scratch while the student's
    # features already move), and the hint term's own ramp-in: its weight grows linearly from 0 over these epochs.
    lr_scale: float = Field(default=1.0, gt=0)
    warmup_epochs: float = Field(default=0.0, ge=0)


class DistillParams(Strict):
    method: Literal["hinton", "dkd", "fitnets"] = "hinton"
    temperature: float = Field(default=4.0, gt=0)  # of every method's softmaxes
    alpha: float = Field(default=0.9, ge=0, le=1)  # hinton, fitnets: weight of the KD term; 1 - alpha weighs the labels
    dkd: DKDParams = DKDParams()  # method dkd only
    hint: HintParams = HintParams()  # method fitnets only
    # Consistent teaching (Beyer et al., CVPR 2022, "Knowledge distillation: A good teacher is patient and
    # consistent"): teacher and student see the same mixed view of each batch, so the student matches the teacher's
    # function between images too. none | mixup | cutmix; lam ~ Beta(mix_alpha, mix_alpha). Any method.
    mix: Literal["none", "mixup", "cutmix"] = "none"
    mix_alpha: float = Field(default=1.0, gt=0)


class SparsityParams(Strict):
    """Learned sparsity (method: sparse): KD training with a group-sparsity penalty before channels are removed."""

    reg: float = Field(default=1e-3, gt=0)  # lambda: weight of the group-norm penalty added to the gradients
    alpha: float = Field(default=4.0, ge=1)  # the weakest group's penalty is alpha times the strongest one's
    epochs: int = Field(default=5, ge=1)  # of penalised KD training (the finetune schedule otherwise)


class PruneParams(Strict):
    target: float = Field(default=0.5, gt=0, lt=1)  # fraction of the student's MACs to remove
    # Fraction of the distilled student's *measured* latency (on `runtime`, batch `latency_batch`) to remove;
    # when set it drives the search instead of `target`.
    latency_target: float | None = Field(default=None, gt=0, lt=1)
    tolerance: float = Field(default=0.05, gt=0, lt=1)  # the reduction reached may exceed the target by this much
    # where latency is measured: the serving runtime (ONNX Runtime on the CPU), or torch on the CPU or CUDA
    runtime: Literal["onnxruntime", "torch-cpu", "cuda"] = "onnxruntime"
    latency_batch: int = Field(default=256, ge=1)
    latency_threads: int = Field(default=1, ge=1)  # intra-op threads while measuring (CPU)
    latency_repeats: int = Field(default=10, ge=1)
    method: Literal["magnitude", "sparse"] = "magnitude"  # how channels are ranked (see kdprune/pruning.py)
    sparsity: SparsityParams = SparsityParams()
    steps: int = Field(default=1, ge=1)  # prune in this many rounds; 1 = one-shot
    round_epochs: int = Field(default=1, ge=1)  # KD fine-tune epochs between rounds (steps > 1)
    round_to: int | None = Field(default=None, ge=1)  # channel multiple; None = by runtime (CPU 1, CUDA 8)
    sensitivity: list[float] = [0.25, 0.5, 0.75]  # targets of the accuracy-vs-target plot (empty = no plot)
    sensitivity_epochs: int = Field(default=0, ge=0)  # KD fine-tune epochs per plot point; 0 = right after pruning
    finetune: TrainParams = TrainParams(epochs=5)

    @model_validator(mode="after")
    def _targets_in_range(self) -> PruneParams:
        if any(not 0 < t < 1 for t in self.sensitivity):
            raise ValueError(f"prune.sensitivity: targets must lie inside (0, 1) (got {self.sensitivity})")
        return self


class EvaluateParams(Strict):
    latency_batch: int = Field(default=256, ge=1)  # the larger batch of the two latency figures
    latency_repeats: int = Field(default=20, ge=1)
    latency_threads: int = Field(default=1, ge=1)  # intra-op threads while measuring (recorded in the report)


class ExportParams(Strict):
    # The export stage fails when an ONNX logit differs from torch's by more than this (on the test split).
    tolerance: float = Field(default=1e-3, gt=0)
    # int8: also quantize statically (kdprune/quantize.py) and serve the INT8 file where it is not significantly
    # worse on the validation images (exact McNemar p <= max_p_value) and faster at batch 1 and the latency batch.
    quantize: Literal["none", "int8"] = "int8"
    calibration_images: int = Field(default=512, ge=1)  # seeded sample of training images
    max_p_value: float = Field(default=0.05, gt=0, le=1)


class RegisterParams(Strict):
    # None (empty in params.yaml): named after the data, kdprune-<dataset> (see `default_model_name`), so a model
    # trained on other images never takes the alias of, or is answered by, another dataset's champion.
    model_name: str = Field(default="kdprune-digits", min_length=1)
    alias: str = Field(default="champion", min_length=1)
    # The gate (kdprune/registry.py): the champion is re-scored on the candidate's validation images, and the
    # candidate must get at least `min_gain` more of them right, with an exact one-sided McNemar p <= max_p_value
    # (1.0 = no test), at no more than max_macs_ratio x the champion's MACs (and max_latency_ratio x its batch-1
    # CPU latency when set; latency measured on other machines or days is noisy, so it is off by default).
    min_gain: int = Field(default=1, ge=1)
    max_p_value: float = Field(default=0.05, gt=0, le=1)
    max_macs_ratio: float = Field(default=1.1, gt=0)
    max_latency_ratio: float | None = Field(default=None, gt=0)
    # Never register a served model that is slower than the distilled student it was pruned from, on the serving
    # runtime (ONNX Runtime CPU, the evaluate stage's interleaved timing), at batch 1 or the latency batch, by more
    # than `speed_tolerance` (a fraction: at batch 1 a tiny model's call is ~25 us of fixed overhead, where two
    # equally fast models measure up to ~10% apart).
    require_faster: bool = True
    speed_tolerance: float = Field(default=0.1, ge=0, lt=1)


class ServeParams(Strict):
    cron: str = "0 3 * * *"  # when `kdprune serve` runs the pipeline

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        try:  # the parser Prefect schedules with; absent on a bare box, where nothing is scheduled either
            from cronsim import CronSim, CronSimError
        except ImportError:
            return value
        from datetime import datetime

        try:
            CronSim(value, datetime(2000, 1, 1))
        except CronSimError as error:
            raise ValueError(f"not a cron expression ({error})") from None
        return value


class FloatRange(Strict):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"empty range: low ({self.low}) > high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        return self


class IntRange(Strict):
    low: int
    high: int

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"empty range: low ({self.low}) > high ({self.high})")
        return self


class SearchSpace(Strict):
    """What the study may choose. Meta-optimization: how to optimise; meta-regularization: how to regularise."""

    # meta-optimization
    optimizer: list[Literal["sgd", "nesterov", "adamw", "hypergrad"]] = ["nesterov", "adamw"]
    # one lr range per optimizer family (a conditional suggestion): SGD-like lrs make AdamW diverge
    lr: FloatRange = FloatRange(low=0.003, high=0.3, log=True)  # sgd, nesterov, hypergrad
    adamw_lr: FloatRange = FloatRange(low=1e-4, high=3e-3, log=True)  # adamw
    momentum: FloatRange = FloatRange(low=0.8, high=0.95)
    batch_size: list[int] = [32, 64, 128]
    schedule: list[Literal["constant", "cosine", "linear"]] = ["linear", "cosine"]
    warmup_epochs: FloatRange = FloatRange(low=0.0, high=1.0)
    # meta-regularization
    weight_decay: FloatRange = FloatRange(low=1e-5, high=1e-2, log=True)
    label_smoothing: FloatRange = FloatRange(low=0.0, high=0.2)
    temperature: FloatRange = FloatRange(low=1.0, high=8.0)
    alpha: FloatRange = FloatRange(low=0.3, high=0.95)
    translate: IntRange = IntRange(low=0, high=2)
    cutout: IntRange = IntRange(low=0, high=0)
    dropout: FloatRange = FloatRange(low=0.0, high=0.3)
    # pareto mode: the student's size
    width: IntRange = IntRange(low=4, high=16)
    prune_target: FloatRange = FloatRange(low=0.1, high=0.8)

    @model_validator(mode="after")
    def _non_empty(self) -> SearchSpace:
        for name in ("optimizer", "batch_size", "schedule"):
            if not getattr(self, name):
                raise ValueError(f"search.space.{name}: empty choice list")
        if any(b < 1 for b in self.batch_size):
            raise ValueError("search.space.batch_size: batch sizes must be >= 1")
        if self.prune_target.low <= 0 or self.prune_target.high >= 1:
            raise ValueError("search.space.prune_target: must lie inside (0, 1)")
        if self.width.low < 1:
            raise ValueError("search.space.width: widths must be >= 1")
        return self


class CompareParams(Strict):
    """The optional defaults-vs-searched stage: equal wall-clock training budget, test accuracy over seeds."""

    enabled: bool = False
    seconds: float = Field(default=60.0, gt=0)  # training budget of each model, wall-clock
    seeds: int = Field(default=3, ge=1)  # each model trained with seeds seed, seed+1, ...: the spread is the noise


class SearchParams(Strict):
    enabled: bool = False  # when true, teacher / student / distill train with the searched params
    mode: Literal["single", "pareto"] = "single"  # pareto: validation accuracy vs MACs (student width, prune target)
    n_trials: int = Field(default=12, ge=1)  # COMPLETE or PRUNED trials per study (teacher, then student)
    fraction: float = Field(default=0.25, gt=0, le=1)  # of the real schedule a trial trains (epochs and warm-up)
    # pareto: the chosen point is the most accurate front point with at most this fraction of the MACs of the
    # params.yaml student (unpruned); null = no budget (the most accurate point)
    max_macs: float | None = Field(default=0.5, gt=0)
    compare: CompareParams = CompareParams()
    workers: int = Field(default=1, ge=1)  # trials running at once
    runner: Literal["threads", "processes", "dask"] = "threads"
    dask_address: str | None = None  # a Dask scheduler (tcp://host:8786); None with runner=dask: a local cluster
    storage: str | None = None  # SQLAlchemy URL of the Optuna study; None = sqlite:///optuna.db in the project
    seed: int = 0  # of the TPE sampler
    space: SearchSpace = SearchSpace()

    @model_validator(mode="after")
    def _dask_address(self) -> SearchParams:
        if self.dask_address and self.runner != "dask":
            raise ValueError(f"search.dask_address is set but search.runner is {self.runner!r}, not 'dask'")
        if self.dask_address and (self.storage is None or self.storage.startswith("sqlite")):
            # workers on other machines cannot open this machine's SQLite file (and SQLite locks over NFS are unsafe)
            raise ValueError("search.dask_address needs a study storage every Dask worker can reach: set "
                             "search.storage to a database server URL (postgresql://...), not SQLite")
        return self


class Params(Strict):
    seed: int = 0
    data: DataParams = DataParams()
    teacher: RoleParams = RoleParams(model=ModelParams(width=32))
    student: RoleParams = RoleParams(model=ModelParams(width=8))
    distill: DistillParams = DistillParams()
    prune: PruneParams = PruneParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    registry: RegisterParams = RegisterParams()
    serve: ServeParams = ServeParams()
    search: SearchParams = SearchParams()

    @model_validator(mode="before")
    @classmethod
    def _model_name_from_data(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("registry") or {}, dict):
            registry = dict(raw.get("registry") or {})
            if registry.get("model_name") is None:
                data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
                raw = {**raw, "registry": {**registry, "model_name": default_model_name(data)}}
        return raw


def default_model_name(data: dict) -> str:
    """kdprune-<dataset>: the source (digits, cifar10), or an image folder's (or archive's) name."""
    source = data.get("source") or "digits"
    if source != "imagefolder" or not data.get("path"):
        return f"kdprune-{source}"
    name = Path(str(data["path"]).rstrip("/")).name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        name = name.removesuffix(suffix)
    return "kdprune-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "images")


def _suggest(loc: tuple[Any, ...]) -> str:
    """'did you mean' for a misspelled key, from the fields of the model that rejected it."""
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))!r}?)" if close else ""


def _one_line(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    loc = tuple(first["loc"])
    field = ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {field!r}{_suggest(loc)}"
    message = first["msg"].removeprefix("Value error, ")
    where = f"{field}: " if field and not message.startswith(field) else ""
    got = first.get("input")
    shown = f" (got {got!r})" if field and not isinstance(got, dict) else ""
    return f"{source}: {where}{message}{shown}"


def _unshared(node: Any) -> Any:
    """A deep copy in which no two places share one object. A YAML anchor (`train: *schedule`) loads as one dict
    shared by several sections; copy.deepcopy and a YAML round trip both keep that sharing, so an override of one
    section would change the others too."""
    if isinstance(node, dict):
        return {key: _unshared(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_unshared(value) for value in node]
    return node


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML), as `dvc exp run -S` does."""
    raw = _unshared(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KdpruneError(f"override {item!r}: expected key=value, e.g. distill.temperature=2")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise KdpruneError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def parse(raw: Any, source: str = "params") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise KdpruneError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise KdpruneError(_one_line(error, source)) from None


def load(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override and validate a params file; every problem is one KdpruneError line."""
    path = Path(path)
    if not path.is_file():
        raise KdpruneError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise KdpruneError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise KdpruneError(f"{path}: params file is not readable ({getattr(error, 'strerror', None) or error})") from None
    if raw is None:  # an empty file must not silently run everything on defaults
        raise KdpruneError(f"{path}: params file is empty (copy the project's params.yaml and edit it)")
    if overrides:
        raw = apply_overrides(raw or {}, overrides)
    return parse(raw, str(path))
