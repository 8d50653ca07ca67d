"""Real servers for the scale-out tests: PostgreSQL, `mlflow server`, `prefect server`, each on 127.0.0.1 and a
free port, in a temporary folder, stopped by the pid it was started with."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

PG_BINARIES = ("initdb", "pg_ctl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; fail early (with the log's tail) if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited {proc.returncode}\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}: not up after {timeout:.0f} s\n{_tail(log)}")


def _tail(log: Path | None) -> str:
    return "" if log is None or not log.is_file() else log.read_text(errors="replace")[-3000:]


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group the server leads (its workers too), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def start(cmd: list[str], log: Path, env: dict, cwd: Path | None = None) -> subprocess.Popen:
    """A server in its own process group (so `stop` reaches its children), output to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


# ------------------------------------------------------------------------------------------- PostgreSQL
def postgres_available() -> bool:
    return all(shutil.which(b) for b in PG_BINARIES)


class Postgres:
    """A throwaway PostgreSQL cluster: trust auth for user `kdprune` on 127.0.0.1 only."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kdprune-pg-"))
        self.port = free_port()
        # initdb refuses to run as root: the cluster then belongs to the unprivileged `postgres` user
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            self.dir.chmod(0o755)
            shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> Postgres:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "kdprune", "-E", "UTF8", "--no-sync")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-t", "60",
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.data} -F", "start")
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://kdprune@127.0.0.1:{self.port}/{database}"

    def new_database(self, name: str) -> str:
        """Create database `name` (fresh per test) and return its SQLAlchemy URL."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)


# ---------------------------------------------------------------------------------------- MLflow, Prefect
@contextmanager
def mlflow_server(backend_uri: str, folder: Path, env: dict):
    """`mlflow server` with `backend_uri` as its store and served artifacts under folder/artifacts; yields its URL."""
    port = free_port()
    log = folder / "mlflow-server.log"
    env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = start(["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                  "--backend-store-uri", backend_uri, "--serve-artifacts",
                  "--artifacts-destination", (folder / "artifacts").as_uri()], log, env, cwd=folder)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@contextmanager
def prefect_server(folder: Path, env: dict):
    """`prefect server start` with its own PREFECT_HOME under `folder`; yields the env that points at it."""
    port = free_port()
    log = folder / "prefect-server.log"
    env = {**env, "PREFECT_HOME": str(folder / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    proc = start(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], log, env, cwd=folder)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 180, proc, log)
        yield {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    finally:
        stop(proc)
