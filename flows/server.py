"""The temporary Prefect server of `kdprune run`, tied to the kdprune process.

Prefect's own temporary server is a child in the caller's process group, so a SIGTERM/SIGINT sent to the group (by
`timeout`, a scheduler, Ctrl-C) stops it before the flow has reported its end, and the flow then hangs retrying;
after kill -9 of the caller it lives on. This one runs in its own session (group signals do not reach it), is
stopped after the flow, and dies with the kdprune process even on kill -9 (Linux parent-death signal).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from kdprune.errors import KdpruneError

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the server is still stopped on every normal or signalled exit


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _drain_to(url: str) -> None:
    """Send the queued logs and events while the server still listens (else: 'Error logging to API' at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=5)
        except Exception:  # noqa: BLE001 - best effort: the run itself is over
            pass


@contextmanager
def temporary_server(timeout: float | None = None) -> Iterator[str | None]:
    """A Prefect API for the block: the configured server if PREFECT_API_URL is set, else a temporary one."""
    import httpx
    import prefect
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, \
        get_current_settings, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    port = _free_port()
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
         "--lifespan", "on"],
        env=env, start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    url = f"http://127.0.0.1:{port}/api"
    try:
        # Prefect's 20 s default is too short for a first start (database migrations) on a busy machine.
        timeout = timeout or (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
                              if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ else 120)
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise KdpruneError(f"the temporary Prefect server exited with code {process.returncode} while starting "
                                   f"(PREFECT_HOME={os.environ.get('PREFECT_HOME', '~/.prefect')})")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise KdpruneError(f"the temporary Prefect server did not start within {timeout:.0f} s; raise "
                                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL")
            time.sleep(0.2)
        os.environ["PREFECT_API_URL"] = url  # for task-runner worker processes, which read the environment
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        _drain_to(url)
        os.environ.pop("PREFECT_API_URL", None)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
