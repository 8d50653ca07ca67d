"""Meta-optimization and meta-regularization: Optuna studies of how to train, judged on the validation split.

Two studies, each its own pipeline stage, in the order the graph runs them:

1. search-teacher: optimizer family with its own lr range, momentum, batch size, schedule, warm-up
   (meta-optimization) and weight decay, label smoothing, augmentation, dropout (meta-regularization); objective:
   the teacher's validation accuracy. Then the teacher stage trains the real teacher with the best point.
2. search-student: the same space plus the KD temperature and alpha, distilling from that real teacher. In
   `pareto` mode the student's width and pruning target join the space, the study has two objectives (validation
   accuracy up, MACs down), and the chosen point is the most accurate front point within `search.max_macs`.

A trial trains `search.fraction` of the role's real schedule (epochs and warm-up scaled together), so a searched
lr/warm-up/schedule is judged on the curve it will be used with. A seeded TPE sampler proposes; a median pruner
(one bracket: TPE models every finished trial) stops trials below the median of earlier ones at the same epoch.

A study's name is a hash of exactly what its trials read (see `trial_inputs`) plus a fingerprint of the code they
run, so a rerun with the same inputs resumes the study, and any relevant change starts a new one.

Workers call `optimize_worker` against the shared study; how they run (threads, processes, Dask) is the caller's
choice (`run_workers`), so this module needs neither Prefect nor Dask.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import torch

from kdprune import data as data_mod
from kdprune.checkpoint import load_model
from kdprune.config import (AugmentParams, DistillParams, DKDParams, ModelParams, Params, SearchParams, SearchSpace,
                             TrainParams)
from kdprune.errors import KdpruneError, TrainingDiverged
from kdprune.io import write_json, write_text
from kdprune.project import (AUGMENT_KEYS, TRAIN_KEYS, Paths, apply_point, input_spec, new_model, resolve_device,
                             make_splits, train_new)
from kdprune.compress import prune_with_kd
from kdprune.train import evaluate as evaluate_split
from kdprune.pruning import count_macs_params
from kdprune.tracking import NullTracker

optuna.logging.set_verbosity(optuna.logging.WARNING)
WorkerRunner = Callable[[Callable[[int], Any], int], list]
State = optuna.trial.TrialState
COUNTED = (State.COMPLETE, State.PRUNED)  # what fills a study's n_trials; failed (diverged, killed) trials do not
# The modules a trial runs: editing one of them starts new studies (and, in dvc.yaml, reruns the search stages).
CODE_FILES = ("search", "project", "train", "distiller", "models", "augment", "optim", "losses", "pruning", "compress",
              "data", "config")
OWNER = f"{socket.gethostname()}:{os.getpid()}"  # recorded on each trial, to fail the trials of a dead process


# ------------------------------------------------------------------------------------------- the space
ALPHA_READERS = ("hinton", "fitnets")  # the distill methods that read distill.alpha (DKD weighs its terms itself)


def suggest(trial: optuna.Trial, space: SearchSpace, *, distill: bool | str, pareto: bool) -> dict[str, Any]:
    """Sample one point of the space (define-by-run); the keys are the params the training stages take.

    `distill`: False for the teacher, else the distill method (True: any): the KD temperature is sampled, and alpha
    only for a method that reads it.

    AdamW draws its lr from its own range (`adamw_lr`): one range for SGD and AdamW wastes trials on diverging
    AdamW runs, and TPE learns nothing from a pruned divergence.
    """
    optimizer = trial.suggest_categorical("optimizer", space.optimizer)
    lr_name, lr_range = ("adamw_lr", space.adamw_lr) if optimizer == "adamw" else ("lr", space.lr)
    s: dict[str, Any] = {
        "optimizer": optimizer,
        "lr": trial.suggest_float(lr_name, lr_range.low, lr_range.high, log=lr_range.log),
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
        if distill is True or distill in ALPHA_READERS:
            s["alpha"] = trial.suggest_float("alpha", space.alpha.low, space.alpha.high)
    if pareto:
        s["width"] = trial.suggest_int("width", space.width.low, space.width.high)
        s["prune_target"] = trial.suggest_float("prune_target", space.prune_target.low, space.prune_target.high)
    return s


def is_pareto(search: SearchParams, role: str) -> bool:
    return search.mode == "pareto" and role == "student"


# ------------------------------------------------------------------------------------------- identity
def code_fingerprint() -> str:
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in CODE_FILES:
        digest.update((here / f"{name}.py").read_bytes())
    return digest.hexdigest()[:12]


def file_fingerprint(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


BUDGET_KEYS = {"teacher": ("search.enabled", "search.n_trials", "search.storage"),
               "student": ("search.enabled", "search.n_trials", "search.storage", "search.max_macs")}


def trial_keys(role: str, method: str | None = None, pareto: bool | None = None) -> list[str]:
    """The params keys one role's trials read: the one list behind a study's identity (`trial_inputs`) and the
    search stage's params in dvc.yaml (kdprune/stage_inputs.py). `method` / `pareto` None: what any method or mode
    reads (dvc.yaml is static).

    Left out: searched keys (the point replaces them), n_trials and max_macs (a budget and a pick among finished
    trials: raising n_trials resumes the study), workers/runner/storage, eval-only tta, compile. The student's
    trials also read the trained teacher (its hash, not a param) and the distillation method's own params."""
    pareto = False if role == "teacher" else pareto
    unread_space = ({"temperature", "alpha"} if role == "teacher"
                    else {"alpha"} if method is not None and method not in ALPHA_READERS else set())
    if pareto is False:
        unread_space |= {"width", "prune_target"}
    keys = ["seed", "search.fraction", "search.seed", *(f"search.space.{k}" for k in SearchSpace.model_fields
                                                          if k not in unread_space)]
    keys += [f"{role}.model.{k}" for k in ModelParams.model_fields
             if k != "dropout" and not (k == "width" and pareto is True)]
    keys += [f"{role}.train.{k}" for k in TrainParams.model_fields
             if k not in (*TRAIN_KEYS, "tta", "compile", "augment")]
    keys += [f"{role}.train.augment.{k}" for k in AugmentParams.model_fields if k not in AUGMENT_KEYS]
    if role == "student":  # the method and its knobs; the searched temperature replaces DKD's own too (apply_point)
        keys += ["search.mode", *(f"distill.{k}" for k in DistillParams.model_fields
                                  if k not in ("temperature", "alpha", "dkd", "hint")),
                 *(f"distill.dkd.{k}" for k in DKDParams.model_fields if k != "temperature"), "distill.hint"]
        if pareto is not False:  # the prune stage's pruner and fine-tune (kdprune/compress.py), at the sampled target
            keys += [f"prune.{k}" for k in ("method", "steps", "round_epochs", "tolerance", "round_to", "runtime",
                                            "sparsity", "finetune")]
    return keys


def _lookup(raw: dict, dotted: str):
    for part in dotted.split("."):
        raw = raw[part]
    return raw


def trial_inputs(params: Params, role: str, dataset_id: str, teacher: str | None = None) -> dict:
    """Exactly what one role's trials read (`trial_keys`), the data and the code they run."""
    raw = params.model_dump()
    keys = trial_keys(role, params.distill.method, is_pareto(params.search, role))
    inputs = {"role": role, "dataset": dataset_id, "code": code_fingerprint(),
              "params": {key: _lookup(raw, key) for key in keys}}
    if role == "student":
        inputs["teacher"] = teacher
    return inputs


def study_name(params: Params, role: str, dataset_id: str, teacher: str | None = None) -> str:
    """Stable per trial inputs: rerunning the same search resumes it; a relevant change starts another study."""
    digest = hashlib.sha256(json.dumps(trial_inputs(params, role, dataset_id, teacher), sort_keys=True).encode())
    return f"kdprune-{role}-{dataset_id}-{digest.hexdigest()[:10]}"


# ------------------------------------------------------------------------------------------- storage
def storage_url(search: SearchParams, paths: Paths, role: str) -> str:
    """search.storage, else one SQLite file per study in search/ (a DVC out of that study's stage)."""
    return search.storage or f"sqlite:///{paths.study_db(role).resolve()}"


def redact(url: str) -> str:
    """The URL without its password (error messages and logs must not show it)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The study storage; an unreachable or malformed URL is one error line naming search.storage."""
    try:
        # Heartbeats let a resumed study mark the trials of a killed worker on another host FAIL.
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and say so on stderr
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=30,
                                              grace_period=120)
    except Exception as error:  # noqa: BLE001 - SQLAlchemy and drivers raise many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
        raise KdpruneError(f"search.storage: cannot open {redact(url)!r} ({redact(reason)[:200]})") from None


def create_study(name: str, url: str, search: SearchParams, role: str) -> optuna.Study:
    """Create the study, or join it if a run with the same name was interrupted (load_if_exists)."""
    return optuna.create_study(study_name=name, storage=open_storage(url), load_if_exists=True,
                               directions=["maximize", "minimize"] if is_pareto(search, role) else ["maximize"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_orphaned_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker process is gone; return their numbers.

    A trial started on this host by a process that no longer exists is failed at once (a killed search rerun
    within the heartbeat grace period would otherwise leave it RUNNING forever); other hosts' trials are failed
    by Optuna's heartbeat check once stale.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(State.RUNNING,)):
        owner_host, _, pid = str(trial.user_attrs.get("owner", "")).rpartition(":")
        if owner_host == host and pid.isdigit() and not _pid_alive(int(pid)):
            study._storage.set_trial_state_values(trial._trial_id, State.FAIL)
            failed.append(trial.number)
    return failed


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


def n_startup(search: SearchParams) -> int:
    """TPE's random start-up trials; every later proposal is model-based (with the single-bracket pruner)."""
    return min(5, search.n_trials)


def _model_based(trial: optuna.Trial, search: SearchParams) -> bool:
    """Whether TPE will model this trial's proposal: it does once n_startup trials are COMPLETE or PRUNED."""
    return len(trial.study.get_trials(deepcopy=False, states=COUNTED)) >= n_startup(search)


def run_trial(trial: optuna.Trial, setup: TrialSetup, prepared: dict, teacher: torch.nn.Module | None):
    """Train one sampled point for the trial budget; report each epoch's validation accuracy to the pruner.

    A pruned trial is PRUNED in Optuna and a FINISHED MLflow run tagged kdprune.trial_state=pruned.
    """
    search = setup.params.search
    pareto = is_pareto(search, setup.role)
    trial.set_user_attr("owner", OWNER)
    trial.set_user_attr("model_based", _model_based(trial, search))
    point = suggest(trial, search.space, distill=setup.role == "student" and setup.params.distill.method,
                    pareto=pareto)
    trial.set_user_attr("point", point)
    params = apply_point(setup.params, setup.role, point, fraction=search.fraction)
    role = getattr(params, setup.role)
    train, val = make_splits(prepared, torch.device(setup.device))
    pruned: optuna.TrialPruned | None = None
    with setup.tracker.run(f"{setup.role}-trial-{trial.number}", tags={"kdprune.trial": trial.number}) as run:
        trial.set_user_attr("mlflow_run_id", run.run_id)
        run.log_params({"role": setup.role, "study": setup.study_name, "epochs": role.train.epochs, **point})

        def on_epoch(row: dict) -> None:
            run.log_metrics(row, step=row["epoch"])
            if not pareto:
                trial.report(row["val_accuracy"], row["epoch"])
                # only before the last epoch: after it the budget is spent and the trial is complete, not pruned
                if row["epoch"] < role.train.epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"epoch {row['epoch']}: val_accuracy {row['val_accuracy']:.4f}")

        try:
            model, history = train_new(role.model, role.train, prepared, train, val, seed=params.seed,
                                       stage=f"{setup.role} trial {trial.number}", teacher=teacher,
                                       distill=params.distill, on_epoch=on_epoch)
        except optuna.TrialPruned as stop:
            run.set_tags({"kdprune.trial_state": "pruned", "kdprune.pruned": str(stop)})
            pruned = stop
        except TrainingDiverged as error:
            run.set_tags({"kdprune.trial_state": "failed", "kdprune.error": str(error)})
            raise
        if pruned is None:
            value = history[-1]["val_accuracy"]
            if pareto:
                try:
                    value, macs = _prune_and_finetune(model, params, role, prepared, train, val, teacher,
                                                      trial.number)
                except (InfeasiblePoint, TrainingDiverged) as error:
                    run.set_tags({"kdprune.trial_state": "failed", "kdprune.error": str(error)})
                    raise
                run.log_metrics({"final_val_accuracy": value, "macs": macs})
            run.set_tags({"kdprune.trial_state": "complete"})
    if pruned is not None:
        raise pruned  # outside the MLflow run: it closes FINISHED
    return (value, macs) if pareto else value


class InfeasiblePoint(Exception):
    """A sampled point that cannot be built (a prune target the channel rounding cannot reach): a FAILED trial."""


def _prune_and_finetune(model, params: Params, role, prepared, train, val, teacher, number: int):
    """Pareto trials: the prune stage's pruner (kdprune/compress.py) at the sampled target, then its KD fine-tune,
    each on the trial's shorter schedule (search.fraction); (val accuracy, MACs)."""
    shape, _ = input_spec(prepared)
    example = torch.zeros(1, *shape)
    fraction = params.search.fraction
    # the sampled prune_target is a MACs target: a latency target would time every trial (noisy, and slow)
    params = params.model_copy(update={"prune": params.prune.model_copy(update={"latency_target": None})})
    try:
        pruned = prune_with_kd(model.cpu(), teacher, params, train, val, example, fraction,
                               stage=f"student trial {number} prune")
    except KdpruneError as error:
        raise InfeasiblePoint(str(error)) from None
    macs, _ = count_macs_params(pruned.model, example)
    model = pruned.kd(pruned.model, params.prune.finetune.epochs, f"student trial {number} fine-tune")
    return evaluate_split(model.to(train.x.device), val)["accuracy"], macs


def counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def optimize_worker(setup: TrialSetup, n_trials: int, worker: int = 0) -> int:
    """One worker: join the study and run up to `n_trials` trials, stopping once the study holds
    search.n_trials COMPLETE or PRUNED trials (failed ones do not count: a resumed run replaces them)."""
    search = setup.params.search
    study = optuna.load_study(study_name=setup.study_name, storage=open_storage(setup.storage),
                              pruner=make_pruner(search, setup.role))
    if counted(study) >= search.n_trials:
        return 0  # a resumed study that is already complete
    study.sampler = make_sampler(search, worker, len(study.trials))
    prepared = data_mod.load_prepared(setup.prepared_path)
    teacher = load_model(setup.teacher_path)[0].to(setup.device) if setup.teacher_path else None
    # MaxTrialsCallback stops every worker once the study holds n_trials, however they interleave.
    study.optimize(lambda trial: run_trial(trial, setup, prepared, teacher), n_trials=n_trials,
                   catch=(TrainingDiverged, InfeasiblePoint),  # a FAILED trial; the study goes on
                   callbacks=[optuna.study.MaxTrialsCallback(search.n_trials, states=COUNTED)])
    return len(study.trials)


def make_sampler(search: SearchParams, worker: int = 0, existing: int = 0) -> optuna.samplers.BaseSampler:
    """The TPE sampler of one worker joining a study that already holds `existing` trials.

    Seeded with seed + worker index (equal seeds would propose the same points); a resumed study (existing > 0)
    also moves the seed past those of earlier runs, else the fresh sampler would replay their proposals.
    """
    return optuna.samplers.TPESampler(seed=search.seed + worker + 10_000 * existing,
                                      n_startup_trials=n_startup(search))


def make_pruner(search: SearchParams, role: str) -> optuna.pruners.BasePruner | None:
    """A median pruner: one bracket, so TPE sees every trial. (Hyperband splits the study into brackets and TPE
    then models each bracket alone, which kept it random: at most 2 of 12 proposals were model-based.)"""
    if is_pareto(search, role):
        return None  # both objectives are only known at the end of a trial
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


def run_in_threads(work: Callable[[int], Any], n: int) -> list:
    """The default worker runner: `n` threads in this process."""
    if n == 1:
        return [work(0)]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(work, range(n)))


def _run_study(setup: TrialSetup, run_workers: WorkerRunner) -> optuna.Study:
    search = setup.params.search
    study = create_study(setup.study_name, setup.storage, search, setup.role)
    fail_orphaned_trials(study)  # before counting: a killed trial is FAIL, and is replaced
    # the trials still missing, shared exactly: a worker that starts while another runs the last trial would
    # run one more (a resumed study one short of n_trials, with 2 workers, ran 2)
    missing = max(0, search.n_trials - counted(study))
    quota = [missing // search.workers + (i < missing % search.workers) for i in range(search.workers)]
    run_workers(lambda i: optimize_worker(setup, quota[i], i) if quota[i] else 0, search.workers)
    return optuna.load_study(study_name=setup.study_name, storage=open_storage(setup.storage))


# ------------------------------------------------------------------------------------------- Pareto
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (accuracy up, MACs down) that no other point dominates."""
    front = []
    for i, (acc, macs) in enumerate(points):
        dominated = any((a >= acc and m <= macs) and (a > acc or m < macs) for j, (a, m) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def choose_on_front(front: list[optuna.trial.FrozenTrial], max_macs: float | None):
    """The most accurate front trial with at most `max_macs` MACs (fewer MACs break ties); when none fits the
    budget, the smallest front trial. Returns (trial, within_budget)."""
    within = [t for t in front if max_macs is None or t.values[1] <= max_macs]
    if not within:
        return min(front, key=lambda t: (t.values[1], -t.values[0])), False
    return max(within, key=lambda t: (t.values[0], -t.values[1])), True


# ------------------------------------------------------------------------------------------- the stage
def _study_summary(study: optuna.Study) -> dict:
    trials = study.trials
    states = [t.state.name for t in trials]
    return {"study": study.study_name, "trials": len(states), "complete": states.count("COMPLETE"),
            "pruned": states.count("PRUNED"), "failed": states.count("FAIL"), "running": states.count("RUNNING"),
            "model_based": sum(bool(t.user_attrs.get("model_based")) for t in trials)}


def _tag_best(tracker, trial: optuna.trial.FrozenTrial) -> None:
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id and hasattr(tracker, "client"):
        tracker.client.set_tag(run_id, "kdprune.best", "true")


def search(role: str, params: Params, paths: Paths, tracker=NullTracker(), device: torch.device | None = None,
           run_workers: WorkerRunner = run_in_threads) -> dict:
    """Run one role's study; write its best point (search/<role>.json, a dep of the role's stages) and reports."""
    best_path = paths.search_best(role)
    if not params.search.enabled:
        _declared_outs(paths, role)
        write_json(best_path, {"enabled": False})
        return {"enabled": False}
    device = device or resolve_device()
    prepared = data_mod.load_prepared(paths.prepared)
    url = storage_url(params.search, paths, role)
    teacher_path = paths.model("teacher") if role == "student" else None
    if teacher_path is not None and not teacher_path.is_file():
        raise KdpruneError(f"{teacher_path}: the student study distils from the trained teacher; run the teacher "
                           "stage first")
    name = study_name(params, role, prepared["dataset_id"], file_fingerprint(teacher_path) if teacher_path else None)
    tracker.log_params({"search": params.search.model_dump(exclude={"space"}), "study": name,
                        "storage": redact(url)})
    # absolute paths: process and Dask workers need not share this process's working directory
    setup = TrialSetup(params=params, role=role, study_name=name, storage=url, prepared_path=paths.prepared.resolve(),
                       teacher_path=teacher_path.resolve() if teacher_path else None, device=str(device),
                       tracker=tracker)
    if not params.search.storage:
        paths.search_dir.mkdir(parents=True, exist_ok=True)
    study = _run_study(setup, run_workers)
    _declared_outs(paths, role)
    complete = [t for t in study.trials if t.state == State.COMPLETE]
    if not complete:
        raise KdpruneError(f"search: no {role} trial completed (all pruned or diverged); widen search.space")
    summary = _study_summary(study)
    best = {"enabled": True, "role": role, "mode": params.search.mode if role == "student" else "single",
            "study": summary, "storage": redact(url)}
    if is_pareto(params.search, role):
        front = [complete[i] for i in pareto_front([tuple(t.values) for t in complete])]
        shape, _ = input_spec(prepared)
        student_macs, _ = count_macs_params(new_model(params.student.model, prepared, params.seed),
                                            torch.zeros(1, *shape))
        max_macs = None if params.search.max_macs is None else params.search.max_macs * student_macs
        chosen, within = choose_on_front(front, max_macs)
        best.update({"macs": int(chosen.values[1]), "max_macs": max_macs, "within_budget": within,
                     "student_macs": student_macs})
        write_pareto(paths, front, complete, chosen, max_macs)
    else:
        chosen = study.best_trial
    best.update({"trial": chosen.number, "val_accuracy": chosen.values[0], "point": chosen.user_attrs["point"]})
    _tag_best(tracker, chosen)
    write_trials_table(paths.search_dir / f"{role}-trials.csv", study)
    write_json(best_path, best)
    tracker.log_metrics({**{k: v for k, v in summary.items() if k != "study"},
                         "best_val_accuracy": best["val_accuracy"]})
    tracker.log_artifact(best_path)
    return best


def _declared_outs(paths: Paths, role: str) -> None:
    """dvc.yaml declares the default study file and the trials table: make them exist even when unused (search
    off, or an external search.storage); an empty file is an empty SQLite database. A student study that is not
    a Pareto search leaves no stale front behind."""
    paths.search_dir.mkdir(parents=True, exist_ok=True)
    paths.study_db(role).touch()
    if not (paths.search_dir / f"{role}-trials.csv").is_file():
        write_trials_table(paths.search_dir / f"{role}-trials.csv")
    if role == "student":
        for name in ("pareto.md", "pareto.png"):
            (paths.search_dir / name).unlink(missing_ok=True)


def write_trials_table(path: Path, study: optuna.Study | None = None) -> None:
    """Every trial, one CSV row (written by the csv module: params are quoted JSON)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["study", "number", "state", "values", "model_based", "point"])
    for t in study.trials if study else []:
        values = "" if t.values is None else ";".join(f"{v:.6g}" for v in t.values)
        writer.writerow([study.study_name, t.number, t.state.name, values, bool(t.user_attrs.get("model_based")),
                         json.dumps(t.user_attrs.get("point", t.params), sort_keys=True)])
    write_text(path, out.getvalue())


def write_pareto(paths: Paths, front: list[optuna.trial.FrozenTrial], trials: list[optuna.trial.FrozenTrial],
                 chosen: optuna.trial.FrozenTrial, max_macs: float | None) -> None:
    """The Pareto front as a Markdown table (the chosen row marked) and a PNG plot with the budget line."""
    budget = "none" if max_macs is None else f"{int(max_macs):,} MACs"
    lines = [f"MACs budget: {budget}; chosen: trial {chosen.number}"
             + ("" if max_macs is None or chosen.values[1] <= max_macs else " (no front point fits the budget: "
                                                                              "the smallest one)"), "",
             "| chosen | trial | val accuracy | MACs | width | prune target | point |",
             "|:---:|---:|---:|---:|---:|---:|---|"]
    for t in sorted(front, key=lambda t: t.values[1]):
        lines.append(f"| {'**x**' if t.number == chosen.number else ''} | {t.number} | {t.values[0]:.4f} | "
                     f"{int(t.values[1]):,} | {t.params['width']} | {t.params['prune_target']:.2f} | "
                     f"`{json.dumps(t.user_attrs.get('point', t.params), sort_keys=True)}` |")
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
    ax.scatter([chosen.values[1]], [chosen.values[0]], s=160, facecolors="none", edgecolors="black", zorder=3,
               label=f"chosen (#{chosen.number})")
    if max_macs is not None:
        ax.axvline(max_macs, ls="--", c="tab:blue", label="MACs budget")
    for t in front_sorted:
        ax.annotate(f"#{t.number}", (t.values[1], t.values[0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    macs = [t.values[1] for t in trials]
    if min(macs) > 0 and max(macs) / min(macs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("MACs per image")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = paths.search_dir / ".pareto.png.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(paths.search_dir / "pareto.png")
