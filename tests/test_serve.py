"""`mlflow models serve` of the registered champion answers a real HTTP client as `kdprune predict` does."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import VENV_BIN, subprocess_env, tiny_params_dict
from kdprune import config, data
from kdprune.predict import softmax
from kdprune.project import Paths
from kdprune.runner import run_stage
from kdprune.tracking import MlflowTracker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, log, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            pytest.fail(f"mlflow models serve exited with {server.returncode}: {log.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout} s")


@pytest.mark.slow
def test_served_champion_answers_like_predict(project):
    run_stage("register", config.parse(tiny_params_dict()), Paths(project), MlflowTracker(), torch.device("cpu"))
    prepared = torch.load(Paths(project).prepared, weights_only=True)
    folder = project / "images"
    folder.mkdir()
    for i in range(5):  # the first is 8x8 grey as trained; the others RGB and larger, so the request must resize
        image = Image.fromarray(prepared["test_x"][i, 0].numpy(), "L")
        (image if i == 0 else image.convert("RGB").resize((24, 24))).save(folder / f"{i}.png")
    files = sorted(folder.iterdir())

    done = subprocess.run([sys.executable, "-m", "kdprune", "predict", *map(str, files)], cwd=project,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    predicted = done.stdout.splitlines()

    # The README's request: images as read_image gives them, scaled to [0, 1], N x C x H x W under "inputs".
    batch = torch.stack([data.read_image(f, 1, 8) for f in files]).float().div(255)
    body = json.dumps({"inputs": batch.tolist()}).encode()
    port = free_port()
    with open(project / "serve.log", "w+") as log:
        server = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/kdprune-test@champion", "--env-manager",
             "local", "--host", "127.0.0.1", "--port", str(port)],
            cwd=project, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_up(f"http://127.0.0.1:{port}/ping", server, log)
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                logits = np.array(json.loads(response.read())["predictions"]["logits"], dtype=np.float32)
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # the server's own session: it and its workers
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    probs = softmax(logits)
    classes = prepared["classes"]
    served = [f"{f}\t{classes[int(p.argmax())]}\t{float(p.max()):.4f}" for f, p in zip(files, probs)]
    assert served == predicted
