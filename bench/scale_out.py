#!/usr/bin/env python
"""Scale-out figures, printed (not asserted): each piece starts and stops its own servers (tests/servers.py).

    python bench/scale_out.py trials   [--trials 12 --epochs 3 --repeats 2]   # trials/minute, 1 vs 2 workers on PostgreSQL
    python bench/scale_out.py deploy   [--repeats 1]                          # a deployment run on a worker vs `kdprune run`

trials: the teacher study of the search (digits, tiny models) on a real PostgreSQL, its trials run by 1 or 2
process workers joining one study (kdprune.search.optimize_worker, the search stage's own worker), 1 and 2
interleaved; the time counts from the first process start to the last trial's end (process start-up included).
deploy: tiny params on digits; `kdprune run` (a temporary Prefect server per process, then against the real
server) vs `kdprune deploy` on a real Prefect server and a `prefect worker start --type process` executing one run, timed from the run's
creation to COMPLETED (the worker polls every PREFECT_WORKER_QUERY_SECONDS, set to 2 here), interleaved.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from kdprune.telemetry import switch_off  # noqa: E402

switch_off()
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("CI", "1")  # plain epoch lines, no progress bars


def _worker(job) -> int:
    from kdprune import search as search_mod

    setup, n_trials, index = job
    return search_mod.optimize_worker(setup, n_trials, index)


def trials(args) -> None:
    import optuna

    from conftest import tiny_params_dict
    from kdprune import config, data as data_mod, search as search_mod
    from servers import Postgres

    raw = tiny_params_dict()
    raw["search"] = {"enabled": True, "n_trials": args.trials, "epochs": args.epochs, "workers": 1,
                     "space": {"batch_size": [64, 128], "translate": {"low": 0, "high": 1}}}
    root = Path(tempfile.mkdtemp(prefix="kdprune-bench-"))
    server = Postgres().start()
    try:
        params = config.parse(raw)
        prepared = root / "prepared.pt"
        data_mod.save_prepared(data_mod.prepare(params.data, params.seed), prepared)
        for repeat in range(args.repeats):
            for workers in (1, 2):
                url = server.new_database(f"bench_{repeat}_{workers}")
                p = config.parse({**raw, "search": {**raw["search"], "workers": workers, "storage": url}})
                setup = search_mod.TrialSetup(params=p, role="teacher", study_name="bench", storage=url,
                                              prepared_path=prepared, teacher_path=None, device="cpu")
                search_mod.create_study("bench", url, p.search, "teacher")
                per_worker = -(-args.trials // workers)
                started = time.perf_counter()
                with ProcessPoolExecutor(workers) as pool:
                    list(pool.map(_worker, [(setup, per_worker, i) for i in range(workers)]))
                seconds = time.perf_counter() - started
                states = [t.state.name for t in optuna.load_study(study_name="bench", storage=url).trials]
                print(f"workers={workers} repeat={repeat}: {len(states)} trials "
                      f"({states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, "
                      f"{states.count('FAIL')} failed) in {seconds:.1f} s = {60 * len(states) / seconds:.1f} trials/min",
                      flush=True)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def deploy(args) -> None:
    import json
    import urllib.request

    import yaml

    from conftest import subprocess_env, tiny_params_dict
    from servers import prefect_server, start, stop

    def api(url, body=None):
        request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"},
                                         method="GET" if body is None else "POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    root = Path(tempfile.mkdtemp(prefix="kdprune-bench-"))
    try:
        (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
        env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", PREFECT_WORKER_QUERY_SECONDS="2")
        with prefect_server(root, env) as server_env:
            a = server_env["PREFECT_API_URL"]
            subprocess.run(["kdprune", "deploy", "--pool", "bench", "--name", "bench"], cwd=root, env=server_env,
                           check=True, capture_output=True)
            deployment = api(f"{a}/deployments/name/kdprune-pipeline/bench")
            worker = start(["prefect", "worker", "start", "--pool", "bench", "--type", "process"],
                           root / "worker.log", server_env, cwd=root)
            try:
                for repeat in range(args.repeats):
                    started = time.perf_counter()
                    local_env = {**env, "PREFECT_HOME": str(root / "local-prefect")}
                    subprocess.run(["kdprune", "run"], cwd=root, env=local_env, check=True, capture_output=True)
                    print(f"repeat={repeat} kdprune run (temporary server): {time.perf_counter() - started:.1f} s",
                          flush=True)
                    started = time.perf_counter()
                    subprocess.run(["kdprune", "run"], cwd=root, env=server_env, check=True, capture_output=True)
                    print(f"repeat={repeat} kdprune run (PREFECT_API_URL = the real server): "
                          f"{time.perf_counter() - started:.1f} s", flush=True)
                    started = time.perf_counter()
                    run = api(f"{a}/deployments/{deployment['id']}/create_flow_run", {})
                    while (state := api(f"{a}/flow_runs/{run['id']}")["state"]["type"]) not in (
                            "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                        time.sleep(0.5)
                    print(f"repeat={repeat} deployment run on a process worker: {time.perf_counter() - started:.1f} s "
                          f"({state})", flush=True)
            finally:
                stop(worker)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("trials")
    t.add_argument("--trials", type=int, default=12)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--repeats", type=int, default=2)
    d = sub.add_parser("deploy")
    d.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    {"trials": trials, "deploy": deploy}[args.what](args)


if __name__ == "__main__":
    main()
