"""Meta-optimization and meta-regularization: an Optuna study of how to train, judged on the validation split.

Two studies run in turn, in one RDB storage (SQLite by default, any SQLAlchemy URL to share it between workers):

1. teacher: optimizer family, learning rate, momentum, batch size, schedule, warm-up (meta-optimization) and
   weight decay, label smoothing, augmentation, dropout (meta-regularization); objective: the teacher's
   validation accuracy after `search.epochs`. A seeded TPE sampler proposes, a Hyperband pruner fed each epoch's
   validation accuracy stops the bad trials early.
2. student: the same space plus the KD temperature and alpha, distilling from a proxy teacher trained for the
   same budget with the best teacher params. In `pareto` mode the student's width and pruning target join the
   space and the study has two objectives (validation accuracy up, MACs down); its Pareto front is reported.

Workers call `optimize_worker` against the shared study; how they run (threads, processes, Dask) is the
caller's choice (`run_workers`), so this module needs neither Prefect nor Dask.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import torch

from kdprune import data as data_mod
from kdprune.checkpoint import load_model, save_model
from kdprune.config import Params, SearchParams, SearchSpace
from kdprune.errors import KdpruneError, TrainingDiverged
from kdprune.io import read_json, write_json, write_text
from kdprune.models import build
from kdprune.pruning import count_macs_params, prune_to_target
from kdprune.tracking import NullTracker
from kdprune.train import Split, evaluate, fit

optuna.logging.set_verbosity(optuna.logging.WARNING)
WorkerRunner = Callable[[Callable[[int], Any], int], list]


# ------------------------------------------------------------------------------------------- the space
def suggest(trial: optuna.Trial, space: SearchSpace, *, distill: bool, pareto: bool) -> dict[str, Any]:
    """Sample one point of the space; the keys are the params the training stages take."""
    s: dict[str, Any] = {
        "optimizer": trial.suggest_categorical("optimizer", space.optimizer),
        "lr": trial.suggest_float("lr", space.lr.low, space.lr.high, log=space.lr.log),
        "momentum": trial.suggest_float("momentum", space.momentum.low, space.momentum.high),
        "batch_size": trial.suggest_categorical("batch_size", space.batch_size),
        "schedule": trial.suggest_categorical("schedule", space.schedule),
        "warmup_epochs": trial.suggest_float("warmup_epochs", space.warmup_epochs.low, space.warmup_epochs.high),
        "weight_decay": trial.suggest_float("weight_decay", space.weight_decay.low, space.weight_decay.high,
                                            log=space.weight_decay.log),
        "label_smoothing": trial.suggest_float("label_smoothing", space.label_smoothing.low, space.label_smoothing.high),
        "translate": trial.suggest_int("translate", space.translate.low, space.translate.high),
        "cutout": trial.suggest_int("cutout", space.cutout.low, space.cutout.high),
        "dropout": trial.suggest_float("dropout", space.dropout.low, space.dropout.high),
    }
    if distill:
        s["temperature"] = trial.suggest_float("temperature", space.temperature.low, space.temperature.high)
        s["alpha"] = trial.suggest_float("alpha", space.alpha.low, space.alpha.high)
    if pareto:
        s["width"] = trial.suggest_int("width", space.width.low, space.width.high)
        s["prune_target"] = trial.suggest_float("prune_target", space.prune_target.low, space.prune_target.high)
    return s


def apply_point(params: Params, role: str, point: dict[str, Any], epochs: int | None = None) -> Params:
    """`params` with one role's training (and, for the student, KD and size) replaced by a sampled point."""
    train_keys = {"optimizer", "lr", "momentum", "batch_size", "schedule", "weight_decay", "label_smoothing"}
    role_params = getattr(params, role)
    train = role_params.train.model_dump()
    train.update({k: v for k, v in point.items() if k in train_keys})
    train["augment"] = {**train["augment"], **{k: point[k] for k in ("translate", "cutout") if k in point}}
    if epochs is not None:
        train["epochs"] = epochs
    train["warmup_epochs"] = min(point.get("warmup_epochs", train["warmup_epochs"]), train["epochs"])
    model = role_params.model.model_dump()
    model.update({k: point[k] for k in ("dropout", "width") if k in point})
    raw = params.model_dump()
    raw[role] = {"model": model, "train": train}
    if role == "student":
        raw["distill"].update({k: point[k] for k in ("temperature", "alpha") if k in point})
        if "prune_target" in point:
            raw["prune"]["target"] = point["prune_target"]
    return Params.model_validate(raw)


def searched_params(params: Params, best: dict) -> Params:
    """The params the training stages use: the search's best points applied when the search is switched on."""
    if not params.search.enabled or not best.get("enabled"):
        return params
    params = apply_point(params, "teacher", best["teacher"])
    return apply_point(params, "student", best["student"])


# ------------------------------------------------------------------------------------------- storage
def storage_url(search: SearchParams, root: Path) -> str:
    return search.storage or f"sqlite:///{(root / 'optuna.db').resolve()}"


def redact(url: str) -> str:
    """The URL without its password (error messages and logs must not show it)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The study storage; an unreachable or malformed URL is one error line naming search.storage."""
    try:
        # Heartbeats let a resumed study mark the trials of a killed worker FAIL instead of RUNNING forever.
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and say so on stderr
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=30,
                                              grace_period=120)
    except Exception as error:  # noqa: BLE001 - SQLAlchemy and drivers raise many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
        raise KdpruneError(f"search.storage: cannot open {redact(url)!r} ({redact(reason)[:200]})") from None


def study_name(params: Params, role: str, dataset_id: str, proxy_point: dict | None = None) -> str:
    """Stable per (data, search config, role): rerunning the same search resumes it instead of mixing studies.

    n_trials is a budget, not part of the study: raising it resumes the study with more trials. The student study
    also depends on its proxy teacher (the teacher's model and the best teacher point it trains with).
    """
    config = {"search": params.search.model_dump(exclude={"workers", "runner", "dask_address", "storage",
                                                          "enabled", "compare_epochs", "n_trials"}),
              role: getattr(params, role).model_dump(), "seed": params.seed}
    if role == "student":
        config["proxy"] = {"teacher": params.teacher.model_dump(), "point": proxy_point}
    config = json.dumps(config, sort_keys=True)
    return f"kdprune-{role}-{dataset_id}-{hashlib.sha256(config.encode()).hexdigest()[:10]}"


def create_study(name: str, url: str, search: SearchParams, role: str) -> optuna.Study:
    """Create the study, or join it if a run with the same name was interrupted (load_if_exists)."""
    pareto = search.mode == "pareto" and role == "student"
    return optuna.create_study(study_name=name, storage=open_storage(url), load_if_exists=True,
                               directions=["maximize", "minimize"] if pareto else ["maximize"])


# ------------------------------------------------------------------------------------------- a trial
@dataclass(frozen=True)
class TrialSetup:
    """All a worker needs, picklable (Dask and process workers rebuild everything from it)."""

    params: Params
    role: str  # "teacher" or "student"
    study_name: str
    storage: str
    prepared_path: Path
    teacher_path: Path | None
    device: str
    tracker: Any = NullTracker()


def run_trial(trial: optuna.Trial, setup: TrialSetup, prepared: dict, teacher: torch.nn.Module | None):
    """Train one sampled point for the trial budget; report each epoch's validation accuracy to the pruner."""
    search = setup.params.search
    pareto = search.mode == "pareto" and setup.role == "student"
    point = suggest(trial, search.space, distill=setup.role == "student", pareto=pareto)
    params = apply_point(setup.params, setup.role, point, epochs=search.epochs)
    role = getattr(params, setup.role)
    device = torch.device(setup.device)
    train, val = (Split.from_prepared(prepared, s, device) for s in ("train", "val"))
    with setup.tracker.run(f"{setup.role}-trial-{trial.number}", tags={"kdprune.trial": trial.number}) as run:
        trial.set_user_attr("mlflow_run_id", run.run_id)
        run.log_params({"role": setup.role, "study": setup.study_name, **point})
        pruned_at: list[int] = []

        def on_epoch(row: dict) -> None:
            run.log_metrics(row, step=row["epoch"])
            if not pareto:
                trial.report(row["val_accuracy"], row["epoch"])
                # only before the last epoch: after it the budget is spent and the trial is complete, not pruned
                if row["epoch"] < role.train.epochs and trial.should_prune():
                    pruned_at.append(row["epoch"])
                    raise optuna.TrialPruned(f"epoch {row['epoch']}: val_accuracy {row['val_accuracy']:.4f}")

        torch.manual_seed(params.seed)
        c, size, _ = prepared["train_x"].shape[1:]
        model = build(role.model.model_dump(), c, size, len(prepared["classes"]))
        try:
            model, history = fit(model, train, val, role.train, stage=f"{setup.role} trial {trial.number}",
                                 seed=params.seed, teacher=teacher, distill=params.distill if teacher else None,
                                 on_epoch=on_epoch)
        except optuna.TrialPruned:
            run.set_tags({"kdprune.trial_state": "pruned"})
            raise
        except TrainingDiverged as error:
            run.set_tags({"kdprune.trial_state": "failed", "kdprune.error": str(error)})
            raise
        value = history[-1]["val_accuracy"]
        if not pareto:
            run.set_tags({"kdprune.trial_state": "complete"})
            return value
        example = torch.zeros(1, c, size, size)
        model = prune_to_target(model.cpu(), example, params.prune.target, params.prune.round_to)
        macs, _ = count_macs_params(model, example)
        model, history = fit(model, train, val, role.train.model_copy(update={"epochs": 1, "warmup_epochs": 0}),
                             stage=f"student trial {trial.number} fine-tune", seed=params.seed, teacher=teacher,
                             distill=params.distill)
        value = history[-1]["val_accuracy"]
        run.log_metrics({"final_val_accuracy": value, "macs": macs})
        run.set_tags({"kdprune.trial_state": "complete"})
        return value, macs


def optimize_worker(setup: TrialSetup, n_trials: int, worker: int = 0) -> int:
    """One worker: join the study and run up to `n_trials` trials (fewer if the study is already complete).

    Each worker seeds its sampler with seed + worker index: equal seeds would propose the same points.
    """
    search = setup.params.search
    study = optuna.load_study(study_name=setup.study_name, storage=open_storage(setup.storage),
                              pruner=_pruner(setup))
    study.sampler = make_sampler(search, worker, len(study.trials))
    prepared = data_mod.load_prepared(setup.prepared_path)
    teacher = load_model(setup.teacher_path)[0].to(setup.device) if setup.teacher_path else None
    if len(study.trials) >= search.n_trials:
        return 0  # a resumed study that is already complete
    # MaxTrialsCallback stops every worker once the study holds n_trials, however they interleave.
    study.optimize(lambda trial: run_trial(trial, setup, prepared, teacher), n_trials=n_trials,
                   catch=(TrainingDiverged,),  # a diverged trial is FAILED; the study goes on
                   callbacks=[optuna.study.MaxTrialsCallback(search.n_trials, states=None)])
    return len(study.trials)


def make_sampler(search: SearchParams, worker: int = 0, existing: int = 0) -> optuna.samplers.BaseSampler:
    """The TPE sampler of one worker joining a study that already holds `existing` trials.

    Seeded with seed + worker index (equal seeds would propose the same points); a resumed study (existing > 0)
    also moves the seed past those of earlier runs, else the fresh sampler would replay their proposals.
    """
    return optuna.samplers.TPESampler(seed=search.seed + worker + 10_000 * existing,
                                      n_startup_trials=min(5, search.n_trials))


def _pruner(setup: TrialSetup):
    if setup.params.search.mode == "pareto" and setup.role == "student":
        return None
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=setup.params.search.epochs)


def run_in_threads(work: Callable[[int], Any], n: int) -> list:
    """The default worker runner: `n` threads in this process."""
    if n == 1:
        return [work(0)]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(work, range(n)))


# ------------------------------------------------------------------------------------------- the stage
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (accuracy up, MACs down) that no other point dominates."""
    front = []
    for i, (acc, macs) in enumerate(points):
        dominated = any((a >= acc and m <= macs) and (a > acc or m < macs) for j, (a, m) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _study_summary(study: optuna.Study) -> dict:
    states = [t.state.name for t in study.trials]
    return {"study": study.study_name, "trials": len(states), "complete": states.count("COMPLETE"),
            "pruned": states.count("PRUNED"), "failed": states.count("FAIL")}


def _tag_best(tracker, trials: list[optuna.trial.FrozenTrial]) -> None:
    for trial in trials:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and hasattr(tracker, "client"):
            tracker.client.set_tag(run_id, "kdprune.best", "true")


def _run_study(setup: TrialSetup, run_workers: WorkerRunner) -> optuna.Study:
    search = setup.params.search
    create_study(setup.study_name, setup.storage, search, setup.role)
    per_worker = math.ceil(search.n_trials / search.workers)
    run_workers(lambda i: optimize_worker(setup, per_worker, i), search.workers)
    return optuna.load_study(study_name=setup.study_name, storage=open_storage(setup.storage))


def search(params: Params, paths, tracker=NullTracker(), device: torch.device | None = None,
           run_workers: WorkerRunner = run_in_threads) -> dict:
    """Run both studies; write the best params (a DVC dependency of the training stages) and the reports."""
    if not params.search.enabled:
        write_json(paths.search_best, {"enabled": False})
        return {"enabled": False}
    from kdprune.stages import resolve_device

    device = device or resolve_device()
    prepared = data_mod.load_prepared(paths.prepared)
    url = storage_url(params.search, paths.root)
    tracker.log_params({"search": params.search.model_dump(exclude={"space"}), "storage": url.split("@")[-1]})
    # absolute paths: process and Dask workers need not share this process's working directory
    base = dict(params=params, storage=url, prepared_path=paths.prepared.resolve(), device=str(device), tracker=tracker)
    teacher_setup = TrialSetup(role="teacher", study_name=study_name(params, "teacher", prepared["dataset_id"]),
                               teacher_path=None, **base)
    teacher_study = _run_study(teacher_setup, run_workers)
    completed = [t for t in teacher_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise KdpruneError("search: no teacher trial completed (all pruned or diverged); widen search.space")
    best_teacher = teacher_study.best_trial
    teacher_point = {k: v for k, v in best_teacher.params.items()}

    # The proxy teacher the student trials distil from: best teacher params, trial budget.
    proxy_params = apply_point(params, "teacher", teacher_point, epochs=params.search.epochs)
    train, val = (Split.from_prepared(prepared, s, device) for s in ("train", "val"))
    torch.manual_seed(params.seed)
    c, size, _ = prepared["train_x"].shape[1:]
    proxy = build(proxy_params.teacher.model.model_dump(), c, size, len(prepared["classes"]))
    proxy, _ = fit(proxy, train, val, proxy_params.teacher.train, stage="search proxy teacher", seed=params.seed)
    save_model(paths.search_dir / "proxy_teacher.pt", proxy, proxy_params.teacher.model.model_dump(), (c, size, size),
               prepared["classes"])

    student_setup = TrialSetup(role="student", study_name=study_name(params, "student", prepared["dataset_id"],
                                                                     teacher_point),
                               teacher_path=(paths.search_dir / "proxy_teacher.pt").resolve(), **base)
    student_study = _run_study(student_setup, run_workers)
    student_trials = [t for t in student_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not student_trials:
        raise KdpruneError("search: no student trial completed (all pruned or diverged); widen search.space")
    if params.search.mode == "pareto":
        front_trials = student_study.best_trials
        best_student = max(front_trials, key=lambda t: (t.values[0], -t.values[1]))
        write_pareto(paths, front_trials, student_trials)
    else:
        front_trials, best_student = [best_teacher], student_study.best_trial
    _tag_best(tracker, [best_teacher, best_student])
    summary = {"teacher": _study_summary(teacher_study), "student": _study_summary(student_study)}
    best = {
        "enabled": True, "mode": params.search.mode,
        "teacher": teacher_point, "student": dict(best_student.params),
        "teacher_val_accuracy": best_teacher.value,
        "student_val_accuracy": best_student.values[0],
        "studies": summary, "storage": url.split("@")[-1],
    }
    write_json(paths.search_best, best)
    write_trials_table(paths.search_dir / "trials.csv", teacher_study, student_study)
    tracker.log_metrics({f"{role}.{k}": v for role, s in summary.items() for k, v in s.items() if k != "study"})
    tracker.log_metrics({"best_teacher_val_accuracy": best["teacher_val_accuracy"],
                         "best_student_val_accuracy": best["student_val_accuracy"]})
    tracker.log_artifact(paths.search_best)
    return best


def write_trials_table(path: Path, *studies: optuna.Study) -> None:
    rows = ["study,number,state,value,params"]
    for study in studies:
        for t in study.trials:
            value = "" if t.values is None else ";".join(f"{v:.6g}" for v in t.values)
            rows.append(f"{study.study_name},{t.number},{t.state.name},{value},\"{json.dumps(t.params, sort_keys=True)}\"".replace('"{', "'{").replace('}"', "}'"))
    write_text(path, "\n".join(rows) + "\n")


def write_pareto(paths, front: list[optuna.trial.FrozenTrial], trials: list[optuna.trial.FrozenTrial]) -> None:
    """The Pareto front as a Markdown table (each row reproducible from its params) and a PNG plot."""
    lines = ["| trial | val accuracy | MACs | width | prune target | params |", "|---:|---:|---:|---:|---:|---|"]
    for t in sorted(front, key=lambda t: t.values[1]):
        lines.append(f"| {t.number} | {t.values[0]:.4f} | {int(t.values[1]):,} | {t.params['width']} | "
                     f"{t.params['prune_target']:.2f} | `{json.dumps(t.params, sort_keys=True)}` |")
    write_text(paths.search_dir / "pareto.md", "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is optional on a bare box; the table carries the same points
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t.values[1] for t in trials], [t.values[0] for t in trials], c="lightgray", label="trials")
    front_sorted = sorted(front, key=lambda t: t.values[1])
    ax.step([t.values[1] for t in front_sorted], [t.values[0] for t in front_sorted], "o-", where="post", c="tab:red",
            label="Pareto front")
    for t in front_sorted:
        ax.annotate(f"#{t.number}", (t.values[1], t.values[0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    macs = [t.values[1] for t in trials]
    if min(macs) > 0 and max(macs) / min(macs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("MACs per image")
    ax.set_ylabel("validation accuracy")
    ax.legend()
    fig.tight_layout()
    tmp = paths.search_dir / ".pareto.png.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(paths.search_dir / "pareto.png")


def load_best(paths) -> dict:
    return read_json(paths.search_best) if Path(paths.search_best).is_file() else {"enabled": False}


def compare(params: Params, paths, best: dict, tracker=NullTracker(), device: torch.device | None = None) -> dict:
    """Defaults vs searched on the same budget: validation and test accuracy of teacher and distilled student.

    Also the online meta-optimizer: the student trained alone with the hypergradient optimizer vs the default's
    fixed schedule. Test accuracy is only reported here, never used to choose.
    """
    from kdprune.stages import resolve_device

    device = device or resolve_device()
    prepared = data_mod.load_prepared(paths.prepared)
    train, val, test = (Split.from_prepared(prepared, s, device) for s in ("train", "val", "test"))
    c, size, _ = prepared["train_x"].shape[1:]
    epochs = params.search.compare_epochs

    def train_role(p: Params, role: str, teacher=None):
        role_params = getattr(p, role)
        tp = role_params.train if epochs is None else role_params.train.model_copy(
            update={"epochs": epochs, "warmup_epochs": min(role_params.train.warmup_epochs, epochs)})
        torch.manual_seed(p.seed)
        model = build(role_params.model.model_dump(), c, size, len(prepared["classes"]))
        model, _ = fit(model, train, val, tp, stage=f"compare {role}", seed=p.seed, teacher=teacher,
                       distill=p.distill if teacher else None)
        return model, tp.epochs

    rows = {}
    searched = searched_params(params.model_copy(update={"search": params.search.model_copy(update={"enabled": True})}), best)
    for label, p in (("defaults", params), ("searched", searched)):
        teacher, n = train_role(p, "teacher")
        student, _ = train_role(p, "student", teacher=teacher)
        for name, model in (("teacher", teacher), ("distilled", student)):
            rows[f"{label} {name}"] = {"val_accuracy": evaluate(model, val)["accuracy"],
                                       "test_accuracy": evaluate(model, test)["accuracy"], "epochs": n}
    hyper = params.model_copy(update={"student": params.student.model_copy(update={
        "train": params.student.train.model_copy(update={"optimizer": "hypergrad", "schedule": "constant"})})})
    for label, p in (("student alone, fixed schedule", params), ("student alone, hypergradient lr", hyper)):
        model, n = train_role(p, "student")
        rows[label] = {"val_accuracy": evaluate(model, val)["accuracy"], "test_accuracy": evaluate(model, test)["accuracy"],
                       "epochs": n}
    lines = ["| model | val accuracy | test accuracy | epochs |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['val_accuracy']:.2%} | {v['test_accuracy']:.2%} | {v['epochs']} |" for k, v in rows.items()]
    studies = best.get("studies", {})
    lines += ["", "| study | trials | complete | pruned | failed |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {role} | {s['trials']} | {s['complete']} | {s['pruned']} | {s['failed']} |" for role, s in studies.items()]
    table = "\n".join(lines) + "\n"
    write_text(paths.search_dir / "report.md", table)
    write_json(paths.search_dir / "compare.json", rows)
    tracker.log_text(table, "search_report.md")
    tracker.log_metrics({f"{k.replace(' ', '_').replace(',', '')}.{m}": v for k, row in rows.items()
                         for m, v in row.items()})
    return {"rows": rows, "table": table}
