"""Nothing executable is loaded from the registry: a pickled model pointed to by the champion alias is refused by
`kdprune predict` and by the register stage's gate, and its payload never runs."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import mlflow_uri, subprocess_env, tiny_params_dict, write_params
from kdprune import config
from kdprune.project import Paths
from kdprune.runner import run_stage
from kdprune.tracking import MlflowTracker

pytestmark = pytest.mark.slow

def _evil_model(marker):
    import mlflow.pyfunc

    class Evil(mlflow.pyfunc.PythonModel):
        """Unpickling this runs a shell command (what an attacker's registered model would do)."""

        def __reduce__(self):
            return os.system, (f"touch {marker}",)

        def predict(self, context, model_input):
            return model_input

    return Evil()


def _register_evil_champion(uri: str, name: str, marker) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=_evil_model(marker))
    client.create_registered_model(name)
    version = client.create_model_version(name, info.model_uri, run_id=run.info.run_id, model_id=info.model_id)
    client.set_registered_model_alias(name, "champion", version.version)
    marker.unlink(missing_ok=True)  # MLflow loads it while logging (to infer its requirements): start clean


def test_a_pickled_champion_is_refused_by_predict_and_register_and_its_payload_never_runs(project):
    marker = project / "payload-ran"
    uri, name = mlflow_uri(project), tiny_params_dict()["registry"]["model_name"]
    _register_evil_champion(uri, name, marker)
    write_params(project / "params.yaml", tiny_params_dict())
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(project / "zero.png")

    done = subprocess.run([sys.executable, "-m", "kdprune", "predict", "zero.png"], cwd=project,
                          env=subprocess_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"models:/{name}@champion: version 1 is not an ONNX model" in done.stderr
    assert not marker.exists()

    result = run_stage("register", config.parse(tiny_params_dict()), Paths(project), MlflowTracker(), torch.device("cpu"))
    assert result["promoted"] is False and result["champion_before"] == "1"
    assert "version 1 is not an ONNX model" in result["reason"] and "alias left on it" in result["reason"]
    assert not marker.exists()

    # the payload is live: MLflow's own loader runs it, which is what kdprune must never call
    import mlflow

    with pytest.raises(AttributeError):  # what unpickles is os.system's exit status, after it ran
        mlflow.pyfunc.load_model(f"models:/{name}/1")
    assert marker.exists()
