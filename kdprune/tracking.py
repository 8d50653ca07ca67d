"""Experiment tracking and the model registry. The only module that knows MLflow (imported lazily).

Stages talk to a tracker: `NullTracker` when tracking is off (tests, bare GPU boxes), `MlflowTracker` otherwise.
Runs nest: the pipeline's parent run holds one child run per stage (and per search trial).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class NullTracker:
    """Records nothing; every stage runs the same with it."""

    run_id: str | None = None

    @contextmanager
    def run(self, name: str, tags: dict | None = None) -> Iterator[NullTracker]:
        yield self

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def set_tags(self, tags: dict) -> None: ...

    def log_model(self, model, name: str, input_example) -> str | None:
        return None

    def champion(self, model_name: str, alias: str) -> dict | None:
        return None

    def register(self, model_uri: str, model_name: str, tags: dict) -> str | None:
        return None

    def set_alias(self, model_name: str, alias: str, version: str) -> None: ...


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite file in the working directory (the project)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _artifacts_beside(tracking_uri: str) -> str | None:
    """For a SQLite store, keep artifacts in mlartifacts/ beside the database file, not in the working directory."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a server or other store decides for itself
    return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


class MlflowTracker:
    """Logs to MLflow by explicit run id (safe across Prefect's worker threads)."""

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None, run_id: str | None = None):
        from kdprune.telemetry import switch_off

        switch_off()  # also when used as a library, before mlflow is imported
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        self.tracking_uri = tracking_uri or default_tracking_uri()
        mlflow.set_tracking_uri(self.tracking_uri)
        self.client = MlflowClient(self.tracking_uri)
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "kdprune"
        found = self.client.get_experiment_by_name(name)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            name, artifact_location=_artifacts_beside(self.tracking_uri))
        self.run_id = run_id

    def __getstate__(self) -> dict:
        # Process and Dask workers rebuild the client from the URI; the run id keeps them nested.
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def __setstate__(self, state: dict) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.__dict__.update(state, _mlflow=mlflow, client=MlflowClient(state["tracking_uri"]))
        mlflow.set_tracking_uri(state["tracking_uri"])

    def _child(self, run_id: str) -> MlflowTracker:
        child = object.__new__(MlflowTracker)
        child.__dict__.update(self.__dict__, run_id=run_id)
        return child

    @contextmanager
    def run(self, name: str, tags: dict | None = None) -> Iterator[MlflowTracker]:
        """A run nested under this tracker's run (top level if none); FAILED/KILLED if the block raises."""
        all_tags = {"mlflow.runName": name, **(tags or {})}
        if self.run_id:
            all_tags["mlflow.parentRunId"] = self.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        try:
            yield self._child(run_id)
        except KeyboardInterrupt:
            self.client.set_terminated(run_id, "KILLED")
            raise
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_model(self, model, name: str, input_example) -> str:
        """Log a PyTorch model (signature inferred from the example); returns its model URI."""
        import torch

        with self._mlflow.start_run(run_id=self.run_id):
            info = self._mlflow.pytorch.log_model(
                model, name=name, input_example=input_example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )
        self.client.update_run(self.run_id, status="RUNNING")  # start_run's exit marked it finished
        return info.model_uri

    def champion(self, model_name: str, alias: str) -> dict | None:
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version_by_alias(model_name, alias)
        except MlflowException:
            return None
        return {"version": version.version, **version.tags}

    def register(self, model_uri: str, model_name: str, tags: dict) -> str:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(model_name)
        except MlflowException:
            self.client.create_registered_model(model_name)
        # a logged model's URI is models:/<model_id>; a tracking server refuses the version without that id
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None
        version = self.client.create_model_version(model_name, model_uri, run_id=self.run_id, model_id=model_id,
                                                   tags={k: str(v) for k, v in tags.items()})
        return version.version

    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(model_name, alias, version)
