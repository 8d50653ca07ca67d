"""The pipeline as a Prefect flow: one MLflow parent run, a task per stage, a Markdown report artifact.

Run inside the project, the flow then records its outputs with `dvc commit`, so `dvc status` stays clean.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from kdprune import config
from kdprune.signals import exit_on_sigterm
from kdprune.errors import KdpruneError
from kdprune.lineage import inputs_fingerprint
from kdprune.lock import project_lock
from kdprune.search import open_storage
from kdprune.run_metrics import report_metrics
from kdprune.project import Paths, resolve_device
from kdprune.tracking import MlflowTracker, NullTracker
from flows.search import run_search
from flows.server import temporary_server
from tasks import stages as t


def dvc_commit(root: Path, params_path: str, overrides: list[str], inputs_before: str | None = None) -> str:
    """Record the flow's outputs in dvc.lock when they match what `dvc repro` would produce: the params and code
    (`inputs_before`, taken when the run started) must be those the run used."""
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return "not a DVC project: outputs not recorded"
    if overrides or Path(params_path).resolve() != (root / "params.yaml").resolve():
        return "params differ from params.yaml (overrides or another file): outputs not recorded in dvc.lock"
    if inputs_before is not None and inputs_fingerprint(params_path) != inputs_before:
        return (f"{params_path} or the kdprune code changed during the run: outputs not recorded in dvc.lock "
                f"(they were made with the earlier version; run again)")
    done = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet"], cwd=root,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"dvc commit failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    return "outputs recorded in dvc.lock (dvc status is clean)"


def dvc_pull(root: Path) -> str:
    """`dvc pull` in a fresh clone (a deployment from git): the data and outputs the repository tracks, from its
    DVC remote. A failure is one error line naming the remote's complaint."""
    if not (root / ".dvc").is_dir():
        raise KdpruneError(f"dvc_pull: {root.resolve()} is not a DVC project (no .dvc/); deploy a repository with "
                           "`dvc init` and a remote, or without --source")
    tracked = sorted(str(f.relative_to(root)) for f in Path(root).rglob("*.dvc")
                     if f.is_file() and ".dvc" not in f.relative_to(root).parts[:-1])
    pulls = [tracked] if tracked else []  # the data (`dvc add`ed) must arrive
    if (root / "dvc.lock").is_file():  # stage outputs: those no one pushed are rebuilt by the run itself
        pulls.append(["--allow-missing"])
    for args in pulls:
        done = subprocess.run([sys.executable, "-m", "dvc", "pull", *args], cwd=root, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or done.stderr.splitlines()
            raise KdpruneError(f"dvc pull failed in {root.resolve()}: {lines[0].strip() if lines else done.returncode}")
    return "dvc pull: data and outputs fetched from the DVC remote"


class _ExpectedErrors(logging.Filter):
    """Drops Prefect's console records (and tracebacks) about errors the CLI reports in one line itself."""

    NAMES = ("KdpruneError", "TrainingDiverged", "ProjectBusy", "DownloadError", "KeyboardInterrupt", "SystemExit",
             "Crash detected", "OSError", "PermissionError", "FileNotFoundError", "IsADirectoryError",
             "NotADirectoryError", "[Errno")

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (KdpruneError, KeyboardInterrupt, SystemExit, OSError)):
            return False
        message = record.getMessage()
        return not any(name in message for name in self.NAMES)


@contextmanager
def expected_errors_quiet(debug: bool) -> Iterator[None]:
    """Without --debug, an expected error is the CLI's one line, not Prefect's 60-line report of it."""
    handlers = [] if debug else list(logging.getLogger().handlers)
    quiet = _ExpectedErrors()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def run_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None, device: str | None = None,
                 tracking: bool = True, force: bool = False, debug: bool = False) -> dict:
    """`kdprune run`: the flow on a temporary Prefect server tied to this process (unless PREFECT_API_URL is set)."""
    with temporary_server(), expected_errors_quiet(debug):
        return pipeline(params_path=params_path, overrides=overrides, device=device, tracking=tracking,
                        resume=not force)


def _search(stage: str, params, paths, tracker, device, resume: bool) -> None:
    """A search stage: a subflow with its trial workers when enabled (Optuna resumes the study itself), else a
    task writing {"enabled": false}."""
    if params.search.enabled:
        run_search(stage, params, paths, tracker, device)
    else:
        getattr(t, stage.replace("-", "_"))(params, paths, tracker, device, resume=resume)


@flow(name="kdprune-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None, device: str | None = None,
             tracking: bool = True, root: str = ".", resume: bool = True, pull: bool = False) -> dict:
    """prepare -> search-teacher -> teacher -> search-student -> student, distill -> [compare] -> prune -> export
    -> evaluate -> register.

    With `resume`, stages whose inputs and outputs are unchanged since they last finished are skipped. With
    `pull` (a deployment from git: each run is a fresh clone), `dvc pull` fetches the tracked data first.
    """
    exit_on_sigterm()  # scheduled runs are stopped with SIGTERM: close the MLflow runs on the way out
    if pull:
        get_run_logger().info(dvc_pull(Path(root)))
    overrides = list(overrides or [])
    inputs_before = inputs_fingerprint(params_path)  # before the params are read: what this run uses
    params = config.load(params_path, overrides)
    paths = Paths(Path(root))
    if params.search.enabled and params.search.storage:  # unreachable: one error line, before any training
        open_storage(params.search.storage)
    dev = resolve_device(device)
    tracker = MlflowTracker() if tracking and os.environ.get("KDPRUNE_TRACKING", "").lower() not in ("off", "0", "false") else NullTracker()
    with project_lock(paths.root, "kdprune pipeline flow"), tracker.run("pipeline", tags={"kdprune.device": str(dev)}) as parent:
        tracker.close_orphans()
        parent.log_params(params.model_dump())
        data = t.prepare(params, paths, parent, dev, resume=resume)
        # --- search order (issue 10): each study right before the stage that trains with its best point
        _search("search-teacher", params, paths, parent, dev, resume)
        t.teacher(params, paths, parent, dev, resume=resume)
        _search("search-student", params, paths, parent, dev, resume)  # distils from the trained teacher
        t.student(params, paths, parent, dev, resume=resume)
        t.distill(params, paths, parent, dev, resume=resume)
        t.compare(params, paths, parent, dev, resume=resume)  # optional: writes {"enabled": false} unless search.compare.enabled
        # --- end search order
        t.prune(params, paths, parent, dev, resume=resume)
        t.export(params, paths, parent, dev, resume=resume)
        report = t.evaluate(params, paths, parent, dev, resume=resume)
        registration = t.register(params, paths, parent, dev, resume=resume)
        table = paths.report_md.read_text()
        summary = (f"{table}\n{paths.per_class_md.read_text()}\nConfusion matrix: {paths.confusion_png} "
                   f"(also an artifact of this MLflow run)\n\nRegistry: {registration['model_name']} v{registration['version']}, "
                   f"{'promoted to' if registration['promoted'] else 'not promoted to'} "
                   f"@{registration['alias']}: {registration['reason']}\n")
        parent.log_metrics(report_metrics(report))
        parent.set_tags({"kd_gain": report.get("kd_gain", {}).get("verdict", "")})
        parent.log_text(summary, "report.md")
        parent.log_artifact(paths.confusion_png)
        create_markdown_artifact(summary, key="kdprune-report", description=f"kdprune on {data['source']}")
    dvc_note = dvc_commit(Path(root), params_path, overrides, inputs_before)
    logger = get_run_logger()
    (logger.warning if "changed during" in dvc_note else logger.info)(dvc_note)
    print(summary)
    return {"report": report, "registration": registration, "dvc": dvc_note, "not_logged": tracker.not_logged()}


def serve(params_path: str, cron: str, overrides: list[str] | None = None, device: str | None = None,
          tracking: bool = True) -> None:
    """Serve the pipeline on `cron` against a real Prefect server (schedules do not fire on the temporary one)."""
    if not os.environ.get("PREFECT_API_URL"):
        raise KdpruneError("serve needs a Prefect server: run scripts/prefect-server.sh and set "
                           "PREFECT_API_URL=http://127.0.0.1:4200/api (see README)")
    pipeline.serve(name="kdprune-scheduled", cron=cron,
                   parameters={"params_path": str(Path(params_path).resolve()), "root": str(Path.cwd()),
                               "overrides": list(overrides or []), "device": device, "tracking": tracking})
