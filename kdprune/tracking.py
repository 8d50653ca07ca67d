"""Experiment tracking and the model registry. The only module that knows MLflow (imported lazily).

Stages talk to a tracker: `NullTracker` when tracking is off (tests, bare GPU boxes), `MlflowTracker` otherwise.
Runs nest: the pipeline's parent run holds one child run per stage (and per search trial).
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from kdprune.errors import KdpruneError
from kdprune.lock import process_alive, process_token

# Bounded retries: MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) turn a dead server into minutes
# of waiting per call. Users can still set these themselves.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
# Per tracking URI: the first error once the store became unusable mid-run, and what could not be logged since.
_LOST: dict[str, dict] = {}


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

    def close_orphans(self) -> list[str]:
        return []

    def not_logged(self) -> str | None:
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def check_store(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line naming the URI, when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                response.read()
        except urllib.error.HTTPError as error:
            if error.code >= 500 or error.code == 404:  # 404: something answers, but it is no MLflow server
                raise KdpruneError(f"MLFLOW_TRACKING_URI {uri}: not a working MLflow server (HTTP {error.code} "
                                   "on /health); fix the URI or use --no-tracking") from None
        except (OSError, ValueError) as error:  # refused, unknown host, timeout
            reason = getattr(error, "reason", None) or error
            raise KdpruneError(f"MLFLOW_TRACKING_URI {uri}: tracking server unreachable ({_first_line(reason) if isinstance(reason, BaseException) else reason}); "
                               "start it, fix the URI, or use --no-tracking") from None
        return
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        folder = db.parent
        if not folder.is_dir():
            raise KdpruneError(f"{folder}: folder of the MLflow store ({uri}) does not exist")
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise KdpruneError(f"{db}: MLflow store is not writable (read-only file); fix its permissions or "
                               "set MLFLOW_TRACKING_URI elsewhere")
        if not os.access(folder, os.W_OK | os.X_OK):  # SQLite writes its journal beside the database
            raise KdpruneError(f"{folder}: folder of the MLflow store is not writable (read-only); fix its "
                               "permissions or set MLFLOW_TRACKING_URI elsewhere")


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
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        for key, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.tracking_uri = tracking_uri or default_tracking_uri()
        check_store(self.tracking_uri)
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        self.run_name = None
        mlflow.set_tracking_uri(self.tracking_uri)
        self.client = MlflowClient(self.tracking_uri)
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "kdprune"
        found = self.client.get_experiment_by_name(name)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            name, artifact_location=_artifacts_beside(self.tracking_uri))
        self.run_id = run_id

    def __getstate__(self) -> dict:
        # Process and Dask workers rebuild the client from the URI; the run id keeps them nested.
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "run_id": self.run_id,
                "run_name": self.run_name}

    def __setstate__(self, state: dict) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.__dict__.update(state, _mlflow=mlflow, client=MlflowClient(state["tracking_uri"]))
        mlflow.set_tracking_uri(state["tracking_uri"])

    def _child(self, run_id: str | None, name: str) -> MlflowTracker:
        child = object.__new__(MlflowTracker)
        child.__dict__.update(self.__dict__, run_id=run_id, run_name=name)
        return child

    # ------------------------------------------------------------------ a store that fails mid-run
    def _store_failed(self, error: BaseException) -> bool:
        """Whether `error` means the store is gone (server down, disk full, read-only), not a bug in the call."""
        if isinstance(error, OSError) or any(text in str(error) for text in ("disk is full", "No space left",
                                                                               "readonly database", "unable to open")):
            return True
        try:
            check_store(self.tracking_uri, timeout=3)
        except KdpruneError:
            return True
        return False

    def _logged(self, what: str, call: Callable, *args, **kwargs):
        """Run one tracking call; once the store has failed, skip it and remember what was not logged."""
        lost = _LOST.get(self.tracking_uri)
        if lost is None and (self.run_id is not None or what.endswith("run")):
            try:
                return call(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - MLflow and its HTTP/SQL layers raise many types
                if not self._store_failed(error):
                    raise
                lost = _LOST.setdefault(self.tracking_uri, {"error": _first_line(error), "missed": []})
        if lost is not None:
            entry = f"{self.run_name or 'run'} {what}"
            if entry not in lost["missed"]:
                lost["missed"].append(entry)
        return None

    def not_logged(self) -> str | None:
        """One line saying what the store did not get because it failed mid-run (None when all was logged)."""
        lost = _LOST.get(self.tracking_uri)
        if not lost:
            return None
        missed = lost["missed"]
        shown = ", ".join(missed[:12]) + (f" and {len(missed) - 12} more" if len(missed) > 12 else "")
        return (f"tracking store {self.tracking_uri} failed mid-run ({lost['error']}); outputs are saved locally; "
                f"not logged: {shown}")

    def close_orphans(self) -> list[str]:
        """Mark KILLED the runs that a kdprune process on this machine left RUNNING when it was killed."""
        runs = self._logged("orphan check run", self.client.search_runs, [self.experiment_id],
                            filter_string="attributes.status = 'RUNNING'", max_results=1000) or []
        closed = []
        for run in runs:
            token = run.data.tags.get("kdprune.process")
            if run.data.tags.get("kdprune.host") == socket.gethostname() and token and not process_alive(token):
                self.client.set_terminated(run.info.run_id, "KILLED")
                closed.append(run.info.run_id)
        return closed

    @contextmanager
    def run(self, name: str, tags: dict | None = None) -> Iterator[MlflowTracker]:
        """A run nested under this tracker's run (top level if none); FAILED/KILLED if the block raises."""
        all_tags = {"mlflow.runName": name, "kdprune.host": socket.gethostname(),
                    "kdprune.process": process_token(), **(tags or {})}
        if self.run_id:
            all_tags["mlflow.parentRunId"] = self.run_id
        run = self._logged("run", self.client.create_run, self.experiment_id, run_name=name, tags=all_tags)
        child = self._child(run.info.run_id if run else None, name)
        try:
            yield child
        except KeyboardInterrupt:
            child._logged("status KILLED", self.client.set_terminated, child.run_id, "KILLED")
            raise
        except BaseException:
            child._logged("status FAILED", self.client.set_terminated, child.run_id, "FAILED")
            raise
        child._logged("status FINISHED", self.client.set_terminated, child.run_id, "FINISHED")

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self._logged("params", self.client.log_batch, self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if items:
            self._logged("metrics", self.client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self._logged("tags", self.client.set_tag, self.run_id, key, str(value))

    def log_artifact(self, path: str | Path) -> None:
        self._logged(f"artifact {Path(path).name}", self.client.log_artifact, self.run_id, str(path))

    def log_text(self, text: str, name: str) -> None:
        self._logged(f"artifact {name}", self.client.log_text, self.run_id, text, name)

    def log_model(self, model, name: str, input_example) -> str | None:
        """Log a PyTorch model (signature inferred from the example); returns its model URI (None if not logged)."""
        import torch

        def log() -> str:
            with self._mlflow.start_run(run_id=self.run_id):
                info = self._mlflow.pytorch.log_model(
                    model, name=name, input_example=input_example,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                )
            self.client.update_run(self.run_id, status="RUNNING")  # start_run's exit marked it finished
            return info.model_uri

        return self._logged("model", log)

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
        version = self.client.create_model_version(model_name, model_uri, run_id=self.run_id,
                                                   tags={k: str(v) for k, v in tags.items()})
        return version.version

    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(model_name, alias, version)
