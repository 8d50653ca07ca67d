"""Experiment tracking and the model registry. The only module that knows MLflow (imported lazily).

Stages talk to a tracker: `NullTracker` when tracking is off (tests, bare GPU boxes), `MlflowTracker` otherwise.
Runs nest: the pipeline's parent run holds one child run per stage (and per search trial).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from kdprune.errors import KdpruneError
from kdprune.lock import process_alive, process_token
from kdprune.signals import deferred_signals

# Bounded retries: MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) turn a dead server into minutes
# of waiting per call. Users can still set these themselves.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
# Per tracking URI: the first error once the store became unusable mid-run, and what could not be logged since.
_LOST: dict[str, dict] = {}
# A version registered as promoted carries this tag until its alias is set: left behind only by a killed run.
ALIAS_PENDING = "kdprune.alias_pending"


def _dead_holder(tags: dict, lease_s: float) -> str | None:
    """Why the holder of a registry lock is dead (its process gone on this host, or its heartbeat stale), else None."""
    host, token = tags.get("kdprune.host"), tags.get("kdprune.process")
    if host == socket.gethostname() and token and not process_alive(token):
        return f"its holder, {tags.get('holder', token)}, is no longer running"
    try:
        age = time.time() - float(tags.get("kdprune.heartbeat", ""))
    except ValueError:
        return None  # a lock from an older kdprune: wait for it (or delete it by hand)
    if age > lease_s:
        return f"its holder, {tags.get('holder', '?')}, last renewed it {age:.0f} s ago"
    return None


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

    def log_model(self, onnx_path, name: str, input_example, metadata: dict | None = None) -> dict | None:
        return None

    def champion(self, model_name: str, alias: str) -> dict | None:
        return None

    @contextmanager
    def registry_lock(self, model_name: str) -> Iterator[None]:
        yield

    def register(self, model: dict, model_name: str, tags: dict, alias_pending: bool = False) -> str | None:
        return None

    def set_alias(self, model_name: str, alias: str, version: str) -> None: ...

    def run_for_output(self, stage: str, sha256: str | None) -> str | None:
        return None

    def log_metrics_to(self, run_id: str, metrics: dict) -> None: ...

    def close_orphans(self) -> list[str]:
        return []

    def not_logged(self) -> str | None:
        return None

    def store_failed(self, error: BaseException) -> bool:
        return False


def _busy(record: logging.LogRecord) -> bool:
    return "database is locked" not in record.getMessage()


def _quiet_busy_store() -> None:
    """MLflow prints a traceback for each SQLite "database is locked" it re-raises; `_logged` waits and says so in
    one line instead (idempotent: one filter however many trackers)."""
    store_log = logging.getLogger("mlflow.store.db.utils")
    if _busy not in store_log.filters:
        store_log.addFilter(_busy)


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

    busy_wait_s = 120.0  # how long a tracking call waits for a SQLite store another process has locked

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None, run_id: str | None = None):
        from kdprune.telemetry import switch_off

        switch_off()  # also when used as a library, before mlflow is imported
        for key, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.tracking_uri = tracking_uri or default_tracking_uri()
        check_store(self.tracking_uri)
        import mlflow
        from mlflow.tracking import MlflowClient

        _quiet_busy_store()
        self._mlflow = mlflow
        self.run_name = None
        mlflow.set_tracking_uri(self.tracking_uri)
        self.client = MlflowClient(self.tracking_uri)
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "kdprune"
        self.experiment_id = self._experiment(name)
        self.run_id = run_id

    def _experiment(self, name: str) -> str:
        """The id of experiment `name`, created if missing. Safe when several processes meet a new store at once:
        the loser of the create (an IntegrityError or RESOURCE_ALREADY_EXISTS, by store) uses the winner's."""
        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=_artifacts_beside(self.tracking_uri),
                                                 tags={"mlflow.experimentKind": "custom_model_development"})
        except Exception:  # noqa: BLE001 - SQLAlchemy, REST and file stores each raise their own type
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

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
    def store_failed(self, error: BaseException) -> bool:
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
        """Run one tracking call; once the store has failed, skip it and remember what was not logged.

        A busy SQLite store (another process holding its write lock) is waited for, up to `busy_wait_s`
        in all, then counted as failed: the run goes on and says at the end what was not logged."""
        lost = _LOST.get(self.tracking_uri)
        if lost is None and (self.run_id is not None or what.endswith("run")):
            deadline, waiting = time.monotonic() + self.busy_wait_s, False
            while True:
                try:
                    with deferred_signals():  # a write cut short by a signal would leave SQLite locked
                        return call(*args, **kwargs)
                except Exception as error:  # noqa: BLE001 - MLflow and its HTTP/SQL layers raise many types
                    busy = "database is locked" in str(error)
                    if busy and time.monotonic() < deadline:
                        if not waiting:
                            waiting = True
                            print(f"tracking store {self.tracking_uri} is busy (another process holds its write "
                                  f"lock): waiting up to {self.busy_wait_s:.0f} s", file=sys.stderr, flush=True)
                        time.sleep(1.0)
                        continue
                    if not busy and not self.store_failed(error):
                        raise
                    lost = _LOST.setdefault(self.tracking_uri, {"error": _first_line(error), "missed": []})
                    break
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
                if self._logged("orphan close run", self.client.set_terminated, run.info.run_id, "KILLED") is None \
                        and self.tracking_uri in _LOST:
                    break  # the store failed (a full disk): the run goes on and says so at the end
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

    def log_metrics_to(self, run_id: str, metrics: dict) -> None:
        """Log on another run of this experiment (the evaluate stage puts each model's numbers on its own run)."""
        self._child(run_id, self.run_name).log_metrics(metrics)

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self._logged("tags", self.client.set_tag, self.run_id, key, str(value))

    def log_artifact(self, path: str | Path) -> None:
        self._logged(f"artifact {Path(path).name}", self.client.log_artifact, self.run_id, str(path))

    def log_text(self, text: str, name: str) -> None:
        self._logged(f"artifact {name}", self.client.log_text, self.run_id, text, name)

    def log_model(self, onnx_path: str | Path, name: str, input_example, metadata: dict | None = None) -> dict | None:
        """Log the served ONNX file as an MLflow model (onnx flavour: ONNX Runtime loads it, nothing is unpickled;
        signature inferred from the example; `metadata`, such as the class names, kept in its MLmodel file): its URI
        and model id (None when the store failed mid-run)."""
        import onnx
        import onnxruntime

        def log() -> dict:
            with self._mlflow.start_run(run_id=self.run_id):
                info = self._mlflow.onnx.log_model(
                    onnx.load(str(onnx_path)), name=name, input_example=input_example, metadata=metadata,
                    save_as_external_data=False, pip_requirements=[f"onnxruntime=={onnxruntime.__version__}"],
                )
            self.client.update_run(self.run_id, status="RUNNING")  # start_run's exit marked it finished
            return {"uri": info.model_uri, "model_id": info.model_id}

        return self._logged("model", log)

    # ------------------------------------------------------------------------------------ model registry
    def champion(self, model_name: str, alias: str) -> dict | None:
        """The version holding `alias` (its number, tags and `models:/` URI), or None."""
        from mlflow.exceptions import MlflowException

        if self.tracking_uri in _LOST:
            return None  # the store failed mid-run: nothing will be registered

        try:
            version = self.client.get_model_version_by_alias(model_name, alias)
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise
        return {**version.tags, "version": str(version.version), "uri": f"models:/{model_name}/{version.version}"}

    def load_registered(self, uri: str) -> RegisteredModel:
        """A registered model (`models:/NAME@ALIAS`, `models:/NAME/3`), loaded from its ONNX file only."""
        return load_registered_model(uri, self.tracking_uri)

    @contextmanager
    def registry_lock(self, model_name: str, timeout_s: float = 600, lease_s: float = 60) -> Iterator[None]:
        """Hold `NAME.lock` while deciding the alias, so two runs' read-champion .. set-alias never interleave.

        The lock is a registered model: creating one is atomic in every MLflow store (a unique name), over HTTP
        too. It names its holder (host, pid and start time) and carries a heartbeat the holder renews every
        `lease_s / 4` s. A lock whose holder is dead is taken over at once: on this host when its process is gone,
        from elsewhere when its heartbeat is older than `lease_s`. Waiting prints a line naming the holder.
        """
        import random
        import threading

        from mlflow.exceptions import MlflowException

        if self.tracking_uri in _LOST:  # the store failed mid-run: nothing will be registered
            yield
            return
        lock, deadline, said = f"{model_name}.lock", time.monotonic() + timeout_s, 0.0
        tags = {"holder": f"{socket.gethostname()} pid {os.getpid()} run {self.run_id}",
                "kdprune.host": socket.gethostname(), "kdprune.process": process_token(),
                "kdprune.heartbeat": f"{time.time():.3f}"}
        while True:
            try:
                self.client.create_registered_model(lock, tags=tags, description="held by a kdprune run deciding the alias")
                break
            except MlflowException as error:
                if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                    continue  # SQL stores: our insert lost to a holder that released before the error was built
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            try:
                held = self.client.get_registered_model(lock)
            except MlflowException:
                continue  # released meanwhile
            why_dead = _dead_holder(held.tags, lease_s)
            if why_dead:
                print(f"register: taking over registry lock {lock!r} ({why_dead})", file=sys.stderr, flush=True)
                self._release(lock)
                continue
            holder = held.tags.get("holder", "?")
            if time.monotonic() > deadline:
                raise KdpruneError(f"registry lock {lock!r} still held by {holder} after {timeout_s:.0f} s; "
                                   f"delete that registered model if its run is dead")
            if time.monotonic() - said > 30:
                print(f"register: waiting for registry lock {lock!r}, held by {holder}", file=sys.stderr, flush=True)
                said = time.monotonic()
            time.sleep(0.2 + random.random() * 0.5)
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(lock, lease_s / 4, stop), daemon=True)
        beat.start()
        try:
            self._reconcile_orphans(model_name)
            yield
        finally:
            stop.set()
            beat.join()
            self._release(lock)

    def _heartbeat(self, lock: str, every_s: float, stop) -> None:
        while not stop.wait(every_s):
            try:
                self.client.set_registered_model_tag(lock, "kdprune.heartbeat", f"{time.time():.3f}")
            except Exception:  # noqa: BLE001 - a missed beat only shortens the lease
                pass

    def _reconcile_orphans(self, model_name: str) -> None:
        """Versions a killed run registered as promoted but never got the alias: say so on them (we hold the lock,
        so no live run is between its version and its alias)."""
        try:
            found = self.client.search_model_versions(f"name = '{model_name}'", max_results=1000)
        except Exception:  # noqa: BLE001 - a new model: nothing to reconcile
            return
        for version in found:
            if version.tags.get(ALIAS_PENDING) == "true":
                self.client.set_model_version_tag(model_name, version.version, "promotion",
                                                  "not promoted: its register run died before moving the alias "
                                                  f"(found by run {self.run_id})")
                self.client.set_model_version_tag(model_name, version.version, "promoted", "false")
                self.client.delete_model_version_tag(model_name, version.version, ALIAS_PENDING)

    def _release(self, lock: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model(lock)
        except MlflowException:
            pass  # already gone (taken over)

    def register(self, model: dict, model_name: str, tags: dict, alias_pending: bool = False) -> str:
        """A new version of `model_name` for a logged model; the registered model is created if missing.
        `alias_pending`: the alias is about to move to it (tagged until `set_alias` is done, see ALIAS_PENDING)."""
        tags = {**tags, ALIAS_PENDING: "true"} if alias_pending else tags
        from mlflow.exceptions import MlflowException

        created = False
        try:
            self.client.create_registered_model(model_name)
            created = True
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            version = self.client.create_model_version(model_name, model["uri"], run_id=self.run_id,
                                                       model_id=model["model_id"],
                                                       tags={k: str(v) for k, v in tags.items()})
        except BaseException:
            if created:  # leave no empty registered model behind
                self.client.delete_registered_model(model_name)
            raise
        return str(version.version)

    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(model_name, alias, version)
        self.client.delete_model_version_tag(model_name, version, ALIAS_PENDING)  # the promotion is complete

    def run_for_output(self, stage: str, sha256: str | None) -> str | None:
        """The latest `stage` run that wrote a file with this sha256 (tag `kdprune.output_sha256`), or None."""
        if not sha256 or self.tracking_uri in _LOST:
            return None
        found = self.client.search_runs(
            [self.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
            filter_string=f"tags.`kdprune.stage` = '{stage}' and tags.`kdprune.output_sha256` = '{sha256}'")
        return found[0].info.run_id if found else None

    # ------------------------------------------------------------------------------ grouping DVC stage runs
    def group_run(self, key: str, name: str, tags: dict, params: dict | None = None) -> str:
        """The id of the parent run tagged `kdprune.group=key` (created, already FINISHED, if there is none, with
        `params` logged on it, so the experiment's row in the UI shows what it ran)."""
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`kdprune.group` = '{key}'",
                                        max_results=1)
        if found:
            return found[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.runName": name, "kdprune.group": key, **tags})
        if params:
            self._child(run.info.run_id, name).log_params(params)
        self.client.set_terminated(run.info.run_id, "FINISHED")  # a container: never left RUNNING
        return run.info.run_id


class RegisteredModel:
    """A registry model for prediction: its ONNX file in an ONNX Runtime session, with its classes and input shape.

    Callable on torch tensors (images in [0, 1]) like the served torch model, so the gate scores it the same way.
    """

    def __init__(self, uri: str, onnx_file: Path, classes: list[str] | None):
        from kdprune.export import OrtModel

        self.uri = uri
        self._model = OrtModel(onnx_file)
        self.input_shape = tuple(int(d) for d in self._model.session.get_inputs()[0].shape[1:])  # [batch, C, H, W]
        n_classes = self._model.session.get_outputs()[0].shape[-1]
        self.classes = [str(c) for c in classes] if classes else [str(i) for i in range(int(n_classes))]

    def logits(self, images):
        """Float N x C x H x W images in [0, 1] (numpy) -> N x classes logits (numpy)."""
        return self._model(torch.from_numpy(images)).numpy()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._model(x)


def _onnx_file(model_uri: str, version: str, folder: Path) -> tuple[Path, dict]:
    """The ONNX file of a downloaded registry model and its MLmodel metadata; anything else is refused in one line.

    Only the `onnx` flavour is accepted: a pickle-based flavour (pytorch, sklearn, a custom python_function) could
    run code when loaded, and the registry holds whatever anyone with write access put there.
    """
    import yaml

    try:
        spec = yaml.safe_load((folder / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise KdpruneError(f"{model_uri}: version {version} has no readable MLmodel file ({_first_line(error)})") from None
    flavors = spec.get("flavors") if isinstance(spec, dict) else None
    flavors = flavors if isinstance(flavors, dict) else {}
    data = (flavors.get("onnx") or {}).get("data") if isinstance(flavors.get("onnx"), dict) else None
    file = (folder / str(data)).resolve() if data else None
    if file is None or file.suffix != ".onnx" or folder.resolve() not in file.parents or not file.is_file():
        raise KdpruneError(f"{model_uri}: version {version} is not an ONNX model (flavours: "
                           f"{', '.join(sorted(map(str, flavors))) or 'none'}); kdprune loads only ONNX models from "
                           f"the registry, never pickled code: not loaded")
    metadata = spec.get("metadata")
    return file, metadata if isinstance(metadata, dict) else {}


def load_registered_model(model_uri: str, tracking_uri: str | None = None) -> RegisteredModel:
    """Load `models:/NAME@ALIAS` or `models:/NAME/VERSION` from the registry; every problem is one KdpruneError line.

    The one registered-model loader (the gate and `kdprune predict`): it reads the ONNX file into ONNX Runtime and
    never calls MLflow's flavour loaders, so nothing from the registry is unpickled or imported. Reads only: a
    missing SQLite store is an error, not a new empty one.
    """
    import tempfile

    tracking_uri = tracking_uri or default_tracking_uri()
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise KdpruneError(f"{model_uri}: no MLflow store at {tracking_uri} (set MLFLOW_TRACKING_URI)")
    name, sep, alias = model_uri.removeprefix("models:/").partition("@")
    name, slash, version = name.partition("/") if not sep else (name, "", "")
    if not model_uri.startswith("models:/") or not name or not (alias or version):
        raise KdpruneError(f"{model_uri}: expected a model URI models:/NAME@ALIAS or models:/NAME/VERSION, or a file")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # predict's output is its answer
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise KdpruneError(f"{model_uri}: no registered model {name!r} in {tracking_uri}") from None
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version!r}"
        raise KdpruneError(f"{model_uri}: registered model {name!r} has no {what}") from None
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="kdprune-registry-") as tmp:
        try:  # downloading runs nothing: the files are only read below
            folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{found.version}", dst_path=tmp))
        except (MlflowException, OSError) as error:
            raise KdpruneError(f"{model_uri}: cannot be downloaded ({_first_line(error)})") from None
        onnx_file, metadata = _onnx_file(model_uri, str(found.version), folder)
        try:  # the session holds the graph in memory: the temporary folder may go
            return RegisteredModel(model_uri, onnx_file, metadata.get("classes"))
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types for a corrupt graph
            raise KdpruneError(f"{model_uri}: version {found.version}'s ONNX file cannot be loaded "
                               f"({_first_line(error)})") from None
