"""`kdprune deploy`: the pipeline as a Prefect deployment on a work pool, run by `prefect worker` processes.

The deployment points at the flow's source (this checkout, or a git URL every worker can clone), carries
the params file and overrides as parameters and `serve.cron` as its schedule. A worker runs each flow run in the
project folder it was deployed from (a local source) or in a fresh clone (a git source); MLflow and the Optuna
storage should be servers every worker reaches (see README, "Scaling out").
"""

from __future__ import annotations

import os
from pathlib import Path

from kdprune.errors import KdpruneError

ENTRYPOINT = "flows/pipeline.py:pipeline"


def is_remote(source: str) -> bool:
    return "://" in source or source.startswith("git@")


def code_folder() -> str:
    """The checkout kdprune runs from (flows/ beside kdprune/): the default source of a deployment."""
    import kdprune

    return str(Path(kdprune.__file__).resolve().parents[1])


def deployment_parameters(params_path: str, overrides: list[str], device: str | None, tracking: bool,
                          source: str) -> dict:
    """The flow's parameters. With a local source, outputs go to this folder (absolute paths, like `kdprune
    serve`); with a git source, each run works in its own clone (paths inside the repository) and first fetches
    the data the repository tracks with `dvc pull`."""
    if is_remote(source):
        if Path(params_path).is_absolute():
            raise KdpruneError(f"--params {params_path}: with a git --source give the params file's path inside "
                               "the repository (workers read it from their clone)")
        return {"params_path": params_path, "overrides": overrides, "device": device, "tracking": tracking,
                "root": ".", "pull": True}
    return {"params_path": str(Path(params_path).resolve()), "overrides": overrides, "device": device,
            "tracking": tracking, "root": str(Path.cwd())}


def ensure_process_pool(pool: str) -> None:
    """Create the work pool (type `process`, Prefect's default job template) unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:
            pass


def deploy(params_path: str, overrides: list[str], cron: str, *, pool: str, name: str, source: str | None = None,
           device: str | None = None, tracking: bool = True) -> str:
    """Create (or update) the deployment `kdprune-pipeline/<name>` on `pool`; returns its id."""
    if not os.environ.get("PREFECT_API_URL"):
        raise KdpruneError("deploy needs a Prefect server that workers reach: set PREFECT_API_URL "
                           "(e.g. http://127.0.0.1:4200/api after scripts/prefect-server.sh; see README)")
    from flows.pipeline import pipeline

    source = source or code_folder()
    parameters = deployment_parameters(params_path, overrides, device, tracking, source)
    # the deploying machine's tracking server goes with the runs (a machine fact, so an env var, not a param)
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI",) if os.environ.get(k)}
    ensure_process_pool(pool)
    deployment_id = pipeline.from_source(source, ENTRYPOINT).deploy(
        name=name, work_pool_name=pool, cron=cron, parameters=parameters, job_variables={"env": env} if env else None,
        build=False, push=False, print_next_steps=False)
    return str(deployment_id)
