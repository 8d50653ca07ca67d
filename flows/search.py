"""The search stage as a Prefect subflow whose trial workers run on the configured task runner.

threads (default) and processes run locally; `dask` uses prefect-dask: the scheduler at search.dask_address, or a
local cluster of search.workers processes when none is given. Every worker joins the same Optuna study.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from kdprune.config import SearchParams
from kdprune.stages import run_stage


@task(name="search-worker", cache_policy=NONE)
def search_worker(work, index: int):
    return work(index)


def submit_workers(work, n: int) -> list:
    futures = [search_worker.submit(work, i) for i in range(n)]
    return [future.result() for future in futures]


def task_runner_for(search: SearchParams):
    if search.runner == "threads":
        return ThreadPoolTaskRunner(max_workers=search.workers)
    if search.runner == "processes":
        return ProcessPoolTaskRunner(max_workers=search.workers)
    from prefect_dask import DaskTaskRunner

    if search.dask_address:
        return DaskTaskRunner(address=search.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": search.workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": ":0"})


@flow(name="kdprune-search", log_prints=True, validate_parameters=False)
def search_flow(params, paths, tracker, device) -> dict:
    best = run_stage("search", params, paths, tracker, device, run_workers=submit_workers)
    report = paths.search_dir / "report.md"
    if best.get("enabled") and report.is_file():
        create_markdown_artifact(report.read_text(), key="kdprune-search-report",
                                 description="defaults vs searched, on the same training budget")
    return best


def run_search(params, paths, tracker, device) -> dict:
    """The search stage with its workers on the task runner that params.search names."""
    if params.search.enabled:  # a bad storage URL is one error line, before Prefect starts (and logs a traceback)
        from kdprune.search import open_storage, storage_url

        open_storage(storage_url(params.search, paths.root))
    return search_flow.with_options(task_runner=task_runner_for(params.search))(params, paths, tracker, device)
