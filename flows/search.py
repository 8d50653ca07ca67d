"""A search stage (search-teacher or search-student) as a Prefect subflow whose trial workers run on the configured task runner.

threads (default) and processes run locally; `dask` uses prefect-dask: the scheduler at search.dask_address, or a
local cluster of search.workers processes when none is given. Every worker joins the same Optuna study.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from kdprune.config import SearchParams
from kdprune.runner import SEARCH_STAGES, run_stage


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
def search_flow(stage: str, params, paths, tracker, device) -> dict:
    best = run_stage(stage, params, paths, tracker, device, run_workers=submit_workers)
    pareto = paths.search_dir / "pareto.md"
    if best.get("enabled") and best.get("mode") == "pareto" and pareto.is_file():
        create_markdown_artifact(pareto.read_text(), key="kdprune-search-pareto",
                                 description="the student's Pareto front, the chosen point marked")
    return best


def run_search(stage: str, params, paths, tracker, device) -> dict:
    """One search stage (search-teacher, search-student) with its workers on the task runner params.search names."""
    if params.search.storage:  # a bad storage URL is one error line, before Prefect starts (and logs a traceback)
        from kdprune.search import open_storage

        open_storage(params.search.storage)
    assert stage in SEARCH_STAGES, stage
    return search_flow.with_options(task_runner=task_runner_for(params.search))(stage, params, paths, tracker, device)
