"""What made a model: the code (git), the params, the data, the stage runs. Plain facts, no tracking library."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import torch

import kdprune


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: str | Path = ".") -> dict[str, str]:
    """The commit checked out in `root` and whether tracked files differ from it ('unknown' outside git)."""
    root = Path(root)
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": "unknown" if changes is None else str(bool(changes)).lower()}


def params_hash(params) -> str:
    """sha256 of the validated params (defaults filled in, keys sorted): equal hashes = the same configuration."""
    text = json.dumps(params.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def file_hash(path: str | Path) -> str | None:
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def inputs_fingerprint(params_path: str | Path) -> str:
    """sha256 of the params file's values and the kdprune package's source: the inputs `dvc.lock` records for the
    stages, which DVC hashes when it commits, i.e. after the stage ran."""
    import yaml

    digest = hashlib.sha256()
    try:  # the values, as DVC compares them: a comment or re-indentation changes nothing
        digest.update(json.dumps(yaml.safe_load(Path(params_path).read_text()), sort_keys=True, default=str).encode())
    except (OSError, yaml.YAMLError):
        digest.update(b"(unreadable params)")
    digest.update(code_hash().encode())
    return digest.hexdigest()


def code_hash() -> str:
    """sha256 of the kdprune package's source files (names and bytes): the code that ran, with or without git."""
    digest = hashlib.sha256()
    package = Path(kdprune.__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def kdprune_version() -> str:
    """The installed distribution's version (pyproject.toml), else the package's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdprune")
    except PackageNotFoundError:
        return kdprune.__version__


def check_inputs_unchanged(before: str, params_path: str | Path, what: str) -> None:
    """Fail (one line) when the params file or the code changed since `before` was taken: the outputs were made with
    the old ones, and DVC would record them against the new ones."""
    if inputs_fingerprint(params_path) != before:
        from kdprune.errors import KdpruneError

        raise KdpruneError(f"{params_path} or the kdprune code changed while {what} ran: its outputs were made with "
                           f"the earlier version, so they are not recorded in dvc.lock; run it again")


def lineage_tags(params, root: str | Path, dataset_id: str, run_ids: dict[str, str]) -> dict[str, str]:
    """Tags for a registered model version (see README, "Reading lineage tags")."""
    root = Path(root)
    tags = {f"lineage.{k}": v for k, v in git_state(root).items()}
    code = git_state(Path(kdprune.__file__).resolve().parent)  # the code's checkout, wherever the project is
    tags.update({
        "lineage.code_git_commit": code["git_commit"],
        "lineage.code_git_dirty": code["git_dirty"],
        "lineage.code_sha256": code_hash(),
        "lineage.params_sha256": params_hash(params),
        "lineage.dataset_id": dataset_id,
        "lineage.kdprune_version": kdprune_version(),
        "lineage.torch_version": torch.__version__,
    })
    dvc_lock = file_hash(root / "dvc.lock")
    if dvc_lock:
        tags["lineage.dvc_lock_sha256"] = dvc_lock
    tags.update({f"lineage.run.{stage}": run_id for stage, run_id in sorted(run_ids.items()) if run_id})
    return tags


# ------------------------------------------------------------------------------- stages run by DVC
def dvc_context(environ: dict | None = None) -> dict[str, str]:
    """Tags naming the DVC stage / experiment when `kdprune stage` runs under `dvc repro` or `dvc exp run`."""
    env = os.environ if environ is None else environ
    names = {"DVC_STAGE": "kdprune.dvc_stage", "DVC_EXP_NAME": "kdprune.dvc_exp",
             "DVC_EXP_BASELINE_REV": "kdprune.dvc_exp_baseline"}
    return {tag: env[var] for var, tag in names.items() if env.get(var)}


def dvc_invocation(environ: dict | None = None) -> str | None:
    """A key shared by the stages of one `dvc repro` / `dvc exp run`, so their runs group under one parent.

    `dvc exp run`: the experiment's name and baseline. `dvc repro`: the pid and start time of the dvc process
    that runs the stages (Linux /proc); None where that cannot be found (the stage runs then stay top level).
    """
    env = os.environ if environ is None else environ
    if not env.get("DVC_STAGE"):
        return None  # not run by DVC
    if env.get("DVC_EXP_NAME"):
        return f"exp:{env.get('DVC_EXP_BASELINE_REV', '')}:{env['DVC_EXP_NAME']}"
    pid = os.getppid()
    for _ in range(6):  # dvc -> (shell) -> kdprune
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if any(Path(a.decode(errors="replace")).name == "dvc" for a in args[:3]):
            return f"repro:{pid}:{fields[19]}"  # field 22 of stat: start time, so a reused pid is another key
        pid = int(fields[1])  # the parent
        if pid <= 1:
            return None
    return None


def run_context(root: str | Path = ".") -> dict[str, str]:
    """Tags for every stage run: the code it ran (git) and, under DVC, the stage and experiment."""
    state = git_state(root)
    return {"kdprune.git_commit": state["git_commit"], "kdprune.git_dirty": state["git_dirty"], **dvc_context()}
