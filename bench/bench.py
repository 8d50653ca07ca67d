#!/usr/bin/env python
"""Benchmark: the seed's recipe and the project's profile, side by side on the same data, in one invocation.

(a) the seed's recipe: seed_large teacher, seed_small trained alone, seed_small distilled; plain SGD (lr 0.01,
    momentum 0.9), batch 128, 10 epochs, constant lr, no weight decay, flip + translate (4 px, RandomCrop(32, 4)).
(b) the profile (default profiles/cifar10-gpu.yaml): teacher, student alone, distilled, pruned.

Both train through the project's own stages (kdprune.stages -> kdprune.train.fit, into a temporary project root
that is removed afterwards); the data goes through kdprune.data (prepare is timed). Per model: test accuracy,
training seconds, MACs, parameters, latency at batch 512 on the device and peak memory during its training, as a
table and as JSON (default bench/results/bench.json).

Training seconds are fit() alone, with the device synchronised before and after. On CUDA, or with
torch.compile on, each fit first runs an untimed one-epoch warm-up on a two-batch slice (cuDNN autotuning,
compilation), so the timed run measures training. Latency: median of `evaluate.latency_repeats` forward passes
of 512 images in eval mode; on CUDA under bf16 autocast with channels_last (as the models train); on the CPU in
fp32, and the fastest pass rather than the median (a shared CPU makes the others slower, not the model). Peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU the process's peak RSS (getrusage), reset
before each training run where Linux allows it.

    python bench/bench.py --quick            # the CPU check: 5,000 / 1,000 images, profiles/cifar10-cpu-quick.yaml
    python bench/bench.py                    # the full set with profiles/cifar10-gpu.yaml (on the GPU machine)
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
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, installed or not

import torch  # noqa: E402
import yaml  # noqa: E402

from kdprune import config, project, stages  # noqa: E402
from kdprune import data as data_mod  # noqa: E402
from kdprune.checkpoint import load_model  # noqa: E402
from kdprune.pruning import count_macs_params  # noqa: E402
from kdprune.train import Split, evaluate  # noqa: E402

LATENCY_BATCH = 512
QUICK_SEED_EPOCHS = 2
SEED_TRAIN = {
    "epochs": 10, "batch_size": 128, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0,
    "schedule": "constant", "warmup_epochs": 0, "label_smoothing": 0.0, "ema": None,
    "augment": {"flip": True, "translate": 4, "cutout": 0}, "tta": False, "compile": False,
}
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
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bench.json", help="JSON results")
    args = parser.parse_args(argv)
    args.data = (args.data or default_data()).resolve()
    if args.profile is None:
        args.profile = REPO / "profiles" / ("cifar10-cpu-quick.yaml" if args.quick else "cifar10-gpu.yaml")
    return args


# --------------------------------------------------------------------------------------------- recipes
def load_profile(path: Path, data: Path) -> tuple[dict, config.Params]:
    """The profile with its data pointed at `data` (always through the imagefolder source)."""
    raw = yaml.safe_load(path.read_text()) or {}
    raw = config.apply_overrides(raw, ["data.source=imagefolder", f"data.path={json.dumps(str(data))}"])
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
    """Milliseconds of one forward pass of LATENCY_BATCH images: median on CUDA (bf16, channels_last), min on the CPU."""
    model = model.eval().to(device)
    x = torch.randn(LATENCY_BATCH, *input_shape, device=device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    times, warmup = [], 3 if cuda else 1
    with torch.inference_mode(), autocast:
        for i in range(warmup + repeats):
            sync(device)
            started = time.perf_counter()
            model(x)
            sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times) if cuda else min(times)  # CPU: min, robust to other jobs on shared cores


# ---------------------------------------------------------------------------------------------- running
ROLE_OF = {"teacher": "teacher", "student": "student", "distilled": "student", "pruned": None}


def run_recipe(recipe: str, params: config.Params, paths: stages.Paths, names: list[str], timer: TimedFit,
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


def summarise(rows: list[dict], params: config.Params, quick: bool) -> tuple[dict, list[str]]:
    get = {(r["recipe"], r["model"]): r for r in rows}
    teacher, student = get[("profile", "teacher")], get[("profile", "student")]
    distilled, pruned = get[("profile", "distilled")], get[("profile", "pruned")]
    summary = {
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
    lines = [
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
    head = ["recipe", "model", "arch", "epochs", "test acc", "train s", "MACs", "params",
            f"{where} ms @{LATENCY_BATCH}", mem]
    body = [[r["recipe"], r["model"], r["arch"], str(r["epochs"]), f"{r['test_accuracy']:.2%}",
             f"{r['train_seconds']:.2f}", f"{r['macs']:,}", f"{r['params']:,}", f"{r['latency_ms_b512']:.2f}",
             f"{r['peak_memory_mb']:,.0f}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 1) + (":" if i >= 3 else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(head), rule, *map(fmt, body)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = stages.resolve_device(args.device)
    if not args.data.exists():
        print(f"bench: {args.data}: not found (pass --data)", file=sys.stderr)
        return 2
    profile_raw, params = load_profile(args.profile, args.data)
    seed_params = seed_recipe(profile_raw, args.quick)
    timer = TimedFit(project.fit, device)
    project.fit = timer  # the stages train through kdprune.project.train_new, which calls fit by this name
    workdir = Path(tempfile.mkdtemp(prefix="kdprune-bench-"))
    try:
        profile_paths, seed_paths = stages.Paths(workdir / "profile"), stages.Paths(workdir / "seed")
        print(f"[bench] preparing {args.data} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        described = stages.prepare(params, profile_paths)
        prepare_seconds = time.perf_counter() - t0
        seed_paths.prepared.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(profile_paths.prepared, seed_paths.prepared)  # the same data, byte for byte
        rows = run_recipe("seed", seed_params, seed_paths, ["teacher", "student", "distilled"], timer, device)
        rows += run_recipe("profile", params, profile_paths, ["teacher", "student", "distilled", "pruned"], timer, device)
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
