"""One Prefect task per pipeline stage; each only calls kdprune.runner.run_stage."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE
from prefect.tasks import exponential_backoff

from kdprune.errors import DownloadError
from kdprune.runner import run_stage


def _download_failed(task, task_run, state) -> bool:
    """Retry only network failures: bad input fails the same way every time."""
    try:
        state.result()
    except DownloadError:
        return True
    except Exception:  # noqa: BLE001
        return False
    return False


def _stage_task(name: str, **options):
    # cache_policy=NONE: stages read and write files; kdprune/resume.py (keyed on dvc.yaml's inputs) decides
    # what is up to date, and checks the output files too, which Prefect's cache would not.
    @task(name=name, cache_policy=NONE, **options)
    def stage(params, paths, tracker, device, resume: bool = False):
        return run_stage(name, params, paths, tracker, device, resume=resume)

    return stage


prepare = _stage_task("prepare", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=10),
                      retry_condition_fn=_download_failed)
search_teacher = _stage_task("search-teacher")
teacher = _stage_task("teacher")
search_student = _stage_task("search-student")
student = _stage_task("student")
distill = _stage_task("distill")
compare = _stage_task("compare")
prune = _stage_task("prune")
export = _stage_task("export")
evaluate = _stage_task("evaluate")
register = _stage_task("register")
