#!/usr/bin/env python
"""Benchmark: the seed's recipe and the project's profile, side by side on the same data, in one invocation.

(a) the seed's recipe: seed_large teacher, seed_small trained alone, seed_small distilled; plain SGD (lr 0.01,
    momentum 0.9), batch 128, 10 epochs, constant lr, no weight decay, flip + translate (4 px, RandomCrop(32, 4)),
    inputs normalised with mean 0.5 / std 0.5 as the seed does.
(a') the same recipe and models through a plain torchvision Dataset + DataLoader with CPU transforms, the way the
    seed (and most users) write it: the images/s of (a) vs (a') is the speed that the project's data path alone
    brings (same model, same device, same images).
(b) the profile (default profiles/cifar10-gpu.yaml): teacher, student alone, distilled, pruned.
(c) with --train-fraction: instead of (a)-(b), the limited-data sweep: at each fraction of the profile's training
    subset and for each --seeds, the teacher, the student alone and the student distilled by each --methods.

Both train through the project's own stages (kdprune.stages -> kdprune.train.fit, into a temporary project root
that is removed afterwards); the data goes through kdprune.data (prepare is timed). Per model: test accuracy,
training seconds, MACs, parameters, latency at batch 512 on the device and peak memory during its training, as a
table and as JSON (default bench/results/bench.json).

Training seconds are fit() alone, with the device synchronised before and after. On CUDA, or with
torch.compile on, each fit first runs an untimed one-epoch warm-up on a two-batch slice (cuDNN autotuning,
compilation), so the timed run measures training. Latency: kdprune.metrics' estimator, median of
`evaluate.latency_repeats` forward passes of 512 images in eval mode after warm-up; on CUDA under bf16 autocast
with channels_last (as the models train); on the CPU in fp32. Peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU the process's peak RSS (getrusage), reset
before each training run where Linux allows it.

    python bench/bench.py --quick            # the CPU check: 5,000 / 1,000 images, profiles/cifar10-cpu-quick.yaml
    python bench/bench.py                    # the full set with profiles/cifar10-gpu.yaml (on the GPU machine)
    python bench/bench.py --quick --train-fraction 0.1 1 --seeds 0 1 2   # KD methods x data fraction, mean +- std
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, installed or not

import torch  # noqa: E402
import yaml  # noqa: E402

from kdprune import config, project, stages  # noqa: E402
from kdprune import data as data_mod  # noqa: E402
from kdprune.checkpoint import load_model  # noqa: E402
from kdprune.errors import KdpruneError  # noqa: E402
from kdprune.metrics import compare_latency  # noqa: E402
from kdprune.pruning import count_macs_params  # noqa: E402
from kdprune.train import Split, evaluate  # noqa: E402

LATENCY_BATCH = 512
QUICK_SEED_EPOCHS = 2
SEED_TRAIN = {
    "epochs": 10, "batch_size": 128, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0,
    "schedule": "constant", "warmup_epochs": 0, "label_smoothing": 0.0, "ema": None,
    "augment": {"flip": True, "translate": 4, "cutout": 0}, "tta": False, "compile": False,
}
KD_METHODS = ("hinton", "dkd", "fitnets")
MIXES = ("mixup", "cutmix")


def kd_variant(name: str) -> str:
    """A --methods entry: METHOD or METHOD+MIX."""
    method, _, mix = name.partition("+")
    if method not in KD_METHODS or (mix and mix not in MIXES):
        raise argparse.ArgumentTypeError(f"{name!r}: expected one of {', '.join(KD_METHODS)}, optionally "
                                         f"+{' or +'.join(MIXES)}")
    return name


def kd_overrides(name: str) -> list[str]:
    method, _, mix = name.partition("+")
    return [f"distill.method={method}", f"distill.mix={mix or 'none'}"]
TARGETS = {"teacher_accuracy": 0.918, "teacher_seconds": 10.0, "student_macs_fraction": 1 / 8,
           "distilled_within_points": 3.0, "kd_gain_points": 1.0, "prune_macs_ratio": 2.0, "round_to": 8}


def default_data() -> Path:
    carried = REPO / ".gpu" / "cifar10-jpg.tar.gz"
    return carried if carried.exists() else (REPO / ".." / "shared" / "data" / "cifar10-jpg.tar.gz").resolve()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="image folder or .tar.gz archive (default: .gpu/cifar10-jpg.tar.gz if present, "
                             "else ../shared/data/cifar10-jpg.tar.gz)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="params file of the project's recipe (default: profiles/cifar10-gpu.yaml; "
                             "with --quick profiles/cifar10-cpu-quick.yaml)")
    parser.add_argument("--quick", action="store_true",
                        help=f"CPU check: the cpu-quick profile (its 5,000 / 1,000-image subset) and "
                             f"{QUICK_SEED_EPOCHS} epochs for the seed's recipe")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the profile, as `kdprune -S` does (repeatable), "
                             "e.g. -S distill.alpha=0.5")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bench.json", help="JSON results")
    parser.add_argument("--train-fraction", type=float, nargs="+", default=None, metavar="F",
                        help="run the limited-data sweep instead: these fractions (0 < F <= 1) of the profile's "
                             "training subset; each trains for as many optimizer steps as the full subset")
    parser.add_argument("--recipes", nargs="+", choices=("seed", "profile"), default=["seed", "profile"],
                        help="which of (a)+(a') and (b) to run (default both)")
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="DataLoader workers of the seed+DataLoader rows (default 0, as the seed's code)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="sweep: these seeds (each seeds the data subset, the split and the init; default 0 1 2)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="sweep: the teacher's and student's epochs on the full subset (default: the profile's; "
                             "the warm-up scales with them)")
    parser.add_argument("--methods", nargs="+", default=list(KD_METHODS), type=kd_variant,
                        help="sweep: distill.method values to compare, each optionally with +mixup or +cutmix "
                             "(distill.mix: consistent teaching), e.g. hinton dkd hinton+mixup")
    parser.add_argument("--profile-data", action="store_true",
                        help="use the profile's own data section (e.g. params.yaml's digits) instead of --data")
    args = parser.parse_args(argv)
    if args.train_fraction and not all(0 < f <= 1 for f in args.train_fraction):
        parser.error("--train-fraction: each fraction must lie in (0, 1]")
    args.data = None if args.profile_data else (args.data or default_data()).resolve()
    if args.profile is None:
        args.profile = REPO / "profiles" / ("cifar10-cpu-quick.yaml" if args.quick else "cifar10-gpu.yaml")
    return args


# --------------------------------------------------------------------------------------------- recipes
def load_profile(path: Path, data: Path | None, overrides: list[str] = ()) -> tuple[dict, config.Params]:
    """The profile with `overrides` (KEY=VALUE) applied and its data pointed at `data` (always through the
    imagefolder source); `data` None keeps the profile's own data section."""
    raw = yaml.safe_load(path.read_text()) or {}
    where = [] if data is None else ["data.source=imagefolder", f"data.path={json.dumps(str(data))}"]
    raw = config.apply_overrides(raw, [*overrides, *where])
    return raw, config.parse(raw, str(path))


def seed_recipe(profile_raw: dict, quick: bool) -> config.Params:
    """The seed's recipe on the profile's data, seed and distillation settings."""
    train = dict(SEED_TRAIN, epochs=QUICK_SEED_EPOCHS if quick else SEED_TRAIN["epochs"])
    raw = copy.deepcopy(profile_raw)
    raw["teacher"] = {"model": {"arch": "seed_large", "dropout": 0.0}, "train": train}
    raw["student"] = {"model": {"arch": "seed_small", "dropout": 0.0}, "train": train}
    raw.pop("search", None)
    return config.parse(raw, "seed recipe")


# ------------------------------------------------------------------------------------------ measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak RSS that getrusage reports
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if platform.system() == "Darwin" else 2**10)


class TimedFit:
    """kdprune.train.fit as the stages call it, timed: sync, (warm-up,) reset peak memory, fit, sync.

    Not a training loop: every run, the warm-up included, is the project's own `fit`.
    """

    def __init__(self, fit, device: torch.device):
        self.fit = fit
        self.device = device
        self.runs: dict[str, dict] = {}

    def __call__(self, model, train: Split, val: Split, params, *, stage: str, **kwargs):
        if self.device.type == "cuda" or params.compile:
            n = min(len(train), 2 * params.batch_size)
            warm = params.model_copy(update={"epochs": 1, "warmup_epochs": 0.0})
            self.fit(copy.deepcopy(model), Split(train.x[:n], train.y[:n], train.mean, train.std),
                     Split(val.x[:256], val.y[:256], val.mean, val.std), warm, stage=f"{stage} (warm-up)",
                     seed=kwargs.get("seed", 0), teacher=kwargs.get("teacher"), distill=kwargs.get("distill"))
        sync(self.device)
        reset_peak_memory(self.device)
        started = time.perf_counter()
        result = self.fit(model, train, val, params, stage=stage, **kwargs)
        sync(self.device)
        self.runs[stage] = {"train_seconds": time.perf_counter() - started, "peak_memory_mb": peak_memory_mb(self.device)}
        return result


def latency_ms(model: torch.nn.Module, input_shape: tuple[int, ...], device: torch.device, repeats: int) -> float:
    """Milliseconds of one forward pass of LATENCY_BATCH images: kdprune.metrics' estimator (warm-up, median wall
    time; on CUDA bf16 and channels_last), with torch's thread setting as it is."""
    return compare_latency({"model": model}, input_shape, LATENCY_BATCH, repeats, device, threads=None)["ms"]["model"]


# ---------------------------------------------------------------------------------------------- running
ROLE_OF = {"teacher": "teacher", "student": "student", "distilled": "student", "pruned": None}


def run_recipe(recipe: str, params: config.Params, paths: project.Paths, names: list[str], timer: TimedFit,
               device: torch.device) -> list[dict]:
    stage_of = {"teacher": stages.teacher, "student": stages.student, "distilled": stages.distill,
                "pruned": stages.prune}
    prepared = data_mod.load_prepared(paths.prepared)
    test = Split.from_prepared(prepared, "test", device)
    rows = []
    for name in names:
        print(f"[bench] {recipe}: {name} ...", file=sys.stderr, flush=True)
        summary = stage_of[name](params, paths, device=device)
        model, payload = load_model(paths.model(name))
        role = ROLE_OF[name]
        train_params = getattr(params, role).train if role else params.prune.finetune
        accuracy = evaluate(model.to(device), test, tta=train_params.tta)["accuracy"]
        shape = tuple(payload["input_shape"])
        macs, n_params = count_macs_params(model.cpu(), torch.zeros(1, *shape))
        spec = payload["spec"]
        rows.append({
            "recipe": recipe, "model": name,
            "arch": f"{spec['arch']}" + (f" w{spec.get('width')}" if spec["arch"] not in ("seed_large", "seed_small") else ""),
            "test_accuracy": accuracy, "epochs": train_params.epochs, **timer.runs[name],
            "stage_seconds": summary.get("train_seconds"), "macs": macs, "params": n_params,
            "latency_ms_b512": latency_ms(model, shape, device, params.evaluate.latency_repeats),
            **({"macs_before": summary["macs_before"]} if name == "pruned" else {}),
        })
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


class SeedDataset(torch.utils.data.Dataset):
    """Images the way torchvision.datasets.CIFAR10 serves them: uint8 arrays in memory, a PIL image per item, then
    the CPU transforms. Built from the prepared split, so both data paths see the same images."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.images = x.permute(0, 2, 3, 1).numpy()  # N, H, W, C
        if self.images.shape[-1] == 1:
            self.images = self.images[..., 0]
        self.labels = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def fit_with_dataloader(model: torch.nn.Module, prepared: dict, val: Split, epochs: int, device: torch.device,
                        workers: int) -> tuple[torch.nn.Module, float, int]:
    """The seed's own training loop (its section 4) over a torchvision DataLoader: the baseline being measured, not a
    loop of the project. Returns the model, the seconds and the images trained on. Like `fit`, it evaluates the
    validation split after every epoch, so both rows do the same work."""
    from torchvision import transforms as T

    c, size = prepared["train_x"].shape[1], prepared["train_x"].shape[2]
    transform = T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(size, padding=4), T.ToTensor(),
                           T.Normalize((0.5,) * c, (0.5,) * c)])
    loader = torch.utils.data.DataLoader(SeedDataset(prepared["train_x"], prepared["train_y"], transform),
                                         batch_size=SEED_TRAIN["batch_size"], shuffle=True, num_workers=workers)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=SEED_TRAIN["lr"], momentum=SEED_TRAIN["momentum"])
    criterion = torch.nn.CrossEntropyLoss()
    sync(device)
    started = time.perf_counter()
    for epoch in range(epochs):
        running_loss = torch.zeros((), device=device)
        for inputs, labels in loader:
            inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.detach()
        val_accuracy = evaluate(model, val)["accuracy"]
        print(f"seed loop (DataLoader) epoch {epoch + 1}/{epochs}: loss={running_loss.item() / len(loader):.4f} "
              f"val_accuracy={val_accuracy:.4f}", file=sys.stderr, flush=True)
    sync(device)
    return model, time.perf_counter() - started, epochs * len(loader.dataset)


def run_dataloader_rows(params: config.Params, paths: project.Paths, fit_rows: list[dict], device: torch.device,
                        workers: int) -> list[dict]:
    """(a'): the seed recipe's teacher and student again, through `fit_with_dataloader`; images/s beside (a)'s."""
    prepared = data_mod.load_prepared(paths.prepared)
    val, test = (Split.from_prepared(prepared, s, device) for s in ("val", "test"))
    n = len(prepared["train_y"])
    batch = min(params.student.train.batch_size, n)
    train_images = (n // batch) * batch  # fit drops the last partial batch
    rows = []
    for fit_row in fit_rows:
        if fit_row["model"] not in ("teacher", "student"):
            continue
        role = getattr(params, fit_row["model"])
        print(f"[bench] seed recipe through a DataLoader: {fit_row['model']} ...", file=sys.stderr, flush=True)
        model = project.new_model(role.model, prepared, params.seed)  # the stages' seed-and-build
        model, seconds, images = fit_with_dataloader(model, prepared, val, role.train.epochs, device, workers)
        fit_row["images_per_second"] = role.train.epochs * train_images / fit_row["train_seconds"]
        rows.append({**fit_row, "recipe": "seed+DataLoader", "test_accuracy": evaluate(model, test)["accuracy"],
                     "train_seconds": seconds, "images_per_second": images / seconds, "peak_memory_mb": float("nan"),
                     "stage_seconds": seconds})
    return rows


# ------------------------------------------------------------------------------------- limited-data sweep
def sweep_params(profile_raw: dict, seed: int, fraction: float, full_train: int,
                 epochs: int | None = None) -> config.Params:
    """The profile at `seed` on `fraction` of its training subset. Every fraction trains for the same number of
    optimizer steps (the same compute): the epochs (and warm-up) grow by the full subset's steps per epoch over
    this subset's. Validation is only observed in the sweep, so it shrinks to 100 images to keep the many short
    epochs of a small fraction cheap."""
    n = max(1, round(fraction * full_train))
    raw = config.apply_overrides(profile_raw, [f"seed={seed}", f"data.max_train={n}", "data.val_fraction=0.002"])
    for role in ("teacher", "student"):
        train = dict(raw[role]["train"])
        batch = train.get("batch_size", 128)
        ratio = (full_train // min(batch, full_train)) / max(1, n // min(batch, n))
        if epochs is not None:  # --epochs: a shorter (or longer) run of the same recipe
            train["warmup_epochs"] = train.get("warmup_epochs", 1.0) * epochs / train.get("epochs", 10)
            train["epochs"] = epochs
        train["epochs"] = max(1, round(train.get("epochs", 10) * ratio))
        train["warmup_epochs"] = train.get("warmup_epochs", 1.0) * ratio
        raw[role]["train"] = train
    raw.pop("search", None)
    return config.parse(raw, "sweep")


def run_sweep(args: argparse.Namespace, profile_raw: dict, device: torch.device) -> int:
    """(c): teacher, student alone and each KD method at each data fraction and seed; test accuracy, mean +- std."""
    base = config.parse(profile_raw, str(args.profile))
    workdir = Path(tempfile.mkdtemp(prefix="kdprune-sweep-"))
    log = args.out.with_suffix(".jsonl")  # one line per trained model, written as they finish
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    rows = []
    try:
        full_train = base.data.max_train or stages.prepare(base, project.Paths(workdir / "count"))["train"]
        for seed in args.seeds:
            for fraction in args.train_fraction:
                params = sweep_params(profile_raw, seed, fraction, full_train, args.epochs)
                paths = project.Paths(workdir / f"s{seed}-f{fraction}")
                described = stages.prepare(params, paths)
                test = Split.from_prepared(data_mod.load_prepared(paths.prepared), "test", device)
                runs = [("teacher", stages.teacher, params, "teacher"), ("student", stages.student, params, "student")]
                runs += [(m, stages.distill, config.parse(config.apply_overrides(params.model_dump(mode="json"),
                                                                                 kd_overrides(m))), "distilled")
                         for m in args.methods]
                for name, stage, p, saved in runs:
                    print(f"[sweep] seed {seed}, fraction {fraction}: {name} ...", file=sys.stderr, flush=True)
                    summary = stage(p, paths, device=device)
                    model, _ = load_model(paths.model(saved))
                    role = "teacher" if name == "teacher" else "student"
                    row = {"seed": seed, "fraction": fraction, "train_images": described["train"], "model": name,
                           "epochs": getattr(p, role).train.epochs,
                           "test_accuracy": evaluate(model.to(device), test, tta=getattr(p, role).train.tta)["accuracy"],
                           "val_accuracy": summary["val_accuracy"], "train_seconds": summary["train_seconds"]}
                    rows.append(row)
                    with log.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table = sweep_table(rows, ["teacher", "student", *args.methods])
    print()
    print(f"limited-data sweep on {device}, profile {args.profile}, seeds {', '.join(map(str, args.seeds))}; "
          f"test accuracy mean +- std over seeds (gain: paired difference to the student alone)")
    print(table)
    args.out.write_text(json.dumps({"profile": str(args.profile), "device": str(device), "rows": rows,
                                    "table": table}, indent=2) + "\n")
    print(f"results: {args.out} (per model: {log})")
    return 0


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} +- {100 * spread:.2f}"


def sweep_table(rows: list[dict], models: list[str]) -> str:
    """Markdown: one row per (fraction, model): accuracy and, for KD methods, the gain over the student alone."""
    lines = ["| fraction | train images | model | test acc % | gain vs student (points) | n |", "|---:|---:|---|---:|---:|---:|"]
    for fraction in sorted({r["fraction"] for r in rows}):
        at = [r for r in rows if r["fraction"] == fraction]
        student = {r["seed"]: r["test_accuracy"] for r in at if r["model"] == "student"}
        for model in models:
            mine = [r for r in at if r["model"] == model]
            if not mine:
                continue
            gains = [r["test_accuracy"] - student[r["seed"]] for r in mine if r["seed"] in student]
            gain = _mean_std(gains) if model not in ("teacher", "student") and gains else ""
            lines.append(f"| {fraction:g} | {mine[0]['train_images']:,} | {model} | "
                         f"{_mean_std([r['test_accuracy'] for r in mine])} | {gain} | {len(mine)} |")
    return "\n".join(lines)


def summarise(rows: list[dict], params: config.Params, quick: bool) -> tuple[dict, list[str]]:
    get = {(r["recipe"], r["model"]): r for r in rows}
    summary, lines = {}, []
    for model in ("teacher", "student"):
        if ("seed+DataLoader", model) in get:
            ours, theirs = get[("seed", model)]["images_per_second"], get[("seed+DataLoader", model)]["images_per_second"]
            summary[f"data_path_speedup_{model}"] = ours / theirs
            lines.append(f"seed {model} ({get[('seed', model)]['arch']}), project data path vs torchvision DataLoader: "
                         f"{ours:,.0f} vs {theirs:,.0f} images/s = {ours / theirs:.2f}x")
    if ("profile", "teacher") not in get:  # --recipes seed
        return summary, lines
    teacher, student = get[("profile", "teacher")], get[("profile", "student")]
    distilled, pruned = get[("profile", "distilled")], get[("profile", "pruned")]
    summary |= {
        "pruned_latency_speedup": distilled["latency_ms_b512"] / pruned["latency_ms_b512"],
        "pruned_macs_ratio": distilled["macs"] / pruned["macs"],
        "student_macs_fraction": distilled["macs"] / teacher["macs"],
        "kd_gain_points": 100 * (distilled["test_accuracy"] - student["test_accuracy"]),
        "distilled_gap_points": 100 * (teacher["test_accuracy"] - distilled["test_accuracy"]),
    }
    if ("seed", "teacher") in get:
        seed_teacher = get[("seed", "teacher")]
        summary["teacher_vs_seed_points"] = 100 * (teacher["test_accuracy"] - seed_teacher["test_accuracy"])
        summary["teacher_vs_seed_time_ratio"] = teacher["train_seconds"] / seed_teacher["train_seconds"]
    checks = {
        f"teacher >= {TARGETS['teacher_accuracy']:.1%} test accuracy": teacher["test_accuracy"] >= TARGETS["teacher_accuracy"],
        f"teacher trains in <= {TARGETS['teacher_seconds']:.0f} s": teacher["train_seconds"] <= TARGETS["teacher_seconds"],
        "student <= 1/8 of the teacher's MACs": summary["student_macs_fraction"] <= TARGETS["student_macs_fraction"],
        "distilled within 3 points of the teacher": summary["distilled_gap_points"] <= TARGETS["distilled_within_points"],
        "distilled >= +1 point over the student alone": summary["kd_gain_points"] >= TARGETS["kd_gain_points"],
        "pruned (round_to 8) >= 2x fewer MACs": (summary["pruned_macs_ratio"] >= TARGETS["prune_macs_ratio"]
                                                 and params.prune.round_to == TARGETS["round_to"]),
    }
    lines += [
        f"pruned vs distilled: {summary['pruned_latency_speedup']:.2f}x faster at batch {LATENCY_BATCH}, "
        f"{summary['pruned_macs_ratio']:.2f}x fewer MACs",
        f"student / teacher MACs: 1/{1 / summary['student_macs_fraction']:.1f}; KD gain "
        f"{summary['kd_gain_points']:+.2f} points; distilled {summary['distilled_gap_points']:.2f} points below the teacher",
    ]
    if "teacher_vs_seed_points" in summary:
        lines.append(f"profile teacher vs seed teacher: {summary['teacher_vs_seed_points']:+.2f} points, "
                     f"{summary['teacher_vs_seed_time_ratio']:.2f}x the training time")
    lines.append("targets" + (" (judged on the full set only; this is a --quick run):" if quick else ":"))
    for text, ok in checks.items():
        lines.append(f"  {'n/a' if quick else ('met' if ok else 'NOT MET'):>7}  {text}")
    summary["targets"] = {text: (None if quick else ok) for text, ok in checks.items()}
    return summary, lines


def format_table(rows: list[dict], device: torch.device) -> str:
    where = "GPU" if device.type == "cuda" else "CPU"
    mem = "peak GPU MB" if device.type == "cuda" else "peak RSS MB"
    head = ["recipe", "model", "arch", "epochs", "test acc", "train s", "img/s", "MACs", "params",
            f"{where} ms @{LATENCY_BATCH}", mem]
    body = [[r["recipe"], r["model"], r["arch"], str(r["epochs"]), f"{r['test_accuracy']:.2%}",
             f"{r['train_seconds']:.2f}", f"{r['images_per_second']:,.0f}" if "images_per_second" in r else "",
             f"{r['macs']:,}", f"{r['params']:,}", f"{r['latency_ms_b512']:.2f}",
             f"{r['peak_memory_mb']:,.0f}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 1) + (":" if i >= 3 else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(head), rule, *map(fmt, body)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = project.resolve_device(args.device)
    if args.data is not None and not args.data.exists():
        print(f"bench: {args.data}: not found (pass --data)", file=sys.stderr)
        return 2
    try:
        profile_raw, params = load_profile(args.profile, args.data, args.set)
    except KdpruneError as error:  # a bad profile or -S value: one line, as kdprune says it
        print(f"bench: {error}", file=sys.stderr)
        return 2
    if args.train_fraction:
        return run_sweep(args, profile_raw, device)
    seed_params = seed_recipe(profile_raw, args.quick)
    timer = TimedFit(project.fit, device)
    project.fit = timer  # the stages train through kdprune.project.train_new, which calls fit by this name
    workdir = Path(tempfile.mkdtemp(prefix="kdprune-bench-"))
    try:
        profile_paths, seed_paths = project.Paths(workdir / "profile"), project.Paths(workdir / "seed")
        print(f"[bench] preparing {args.data} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        described = stages.prepare(params, profile_paths)
        prepare_seconds = time.perf_counter() - t0
        seed_paths.prepared.parent.mkdir(parents=True, exist_ok=True)
        seed_prepared = data_mod.load_prepared(profile_paths.prepared)  # the same images, normalised as the seed:
        seed_prepared["mean"] = torch.full_like(seed_prepared["mean"], 0.5)  # Normalize((0.5,) * 3, (0.5,) * 3)
        seed_prepared["std"] = torch.full_like(seed_prepared["std"], 0.5)
        data_mod.save_prepared(seed_prepared, seed_paths.prepared)
        rows = []
        if "seed" in args.recipes:
            rows += run_recipe("seed", seed_params, seed_paths, ["teacher", "student", "distilled"], timer, device)
            rows += run_dataloader_rows(seed_params, seed_paths, rows, device, args.loader_workers)
        if "profile" in args.recipes:
            rows += run_recipe("profile", params, profile_paths, ["teacher", "student", "distilled", "pruned"], timer,
                               device)
    finally:
        project.fit = timer.fit
        shutil.rmtree(workdir, ignore_errors=True)
    summary, lines = summarise(rows, params, args.quick)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print()
    print(f"kdprune bench on {name}, torch {torch.__version__}; profile {args.profile.relative_to(REPO) if args.profile.is_relative_to(REPO) else args.profile}"
          f"{' (--quick)' if args.quick else ''}")
    print(f"data: {args.data} -> {described['train']:,} train / {described['val']:,} val / {described['test']:,} test; "
          f"prepare (kdprune.data, imagefolder): {prepare_seconds:.1f} s")
    print(format_table(rows, device))
    for line in lines:
        print(line)
    total = time.perf_counter() - started
    print(f"bench wall time: {total:.0f} s")
    result = {"device": str(device), "device_name": name, "torch": torch.__version__, "quick": args.quick,
              "profile": str(args.profile), "data": str(args.data), "dataset": described,
              "prepare_seconds": prepare_seconds, "latency_batch": LATENCY_BATCH, "rows": rows, "summary": summary,
              "wall_seconds": total}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
