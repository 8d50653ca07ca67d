"""Resume: a stage whose inputs and outputs are unchanged since it last finished is not run again.

When a stage finishes, a record (`.kdprune/stages/NAME.json`) keeps a fingerprint of its inputs and the hashes of
its outputs. The inputs are what dvc.yaml declares for the stage (its params sections, its code and upstream
files), read from the project's dvc.yaml as plain YAML, so DVC itself is not needed. A stage is up to date when
its record's fingerprint equals the current one and every output still has its recorded hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

import kdprune
from kdprune.io import write_json

CODE_ROOT = Path(kdprune.__file__).resolve().parents[1]  # the code that runs, wherever the project lives
_hashes: dict[tuple, str] = {}


def record_path(root: Path, name: str) -> Path:
    return Path(root) / ".kdprune" / "stages" / f"{name}.json"


def file_md5(path: Path) -> str | None:
    """md5 of a file, or of a folder's files and names (None if absent), cached by path, size and mtime."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        listing = [(p.relative_to(path).as_posix(), file_md5(p)) for p in files]
        return hashlib.md5(json.dumps(listing).encode()).hexdigest()
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        with path.open("rb") as file:
            _hashes[key] = hashlib.file_digest(file, "md5").hexdigest()
    return _hashes[key]


def _entries(items) -> list[str]:
    """dvc.yaml lists hold paths or {path: options}."""
    return [next(iter(item)) if isinstance(item, dict) else str(item) for item in items or []]


def stage_spec(root: Path, name: str) -> dict | None:
    """deps, params and outs of `name` in the project's dvc.yaml (else the one beside the code); None if absent."""
    for dvc_yaml in (Path(root) / "dvc.yaml", CODE_ROOT / "dvc.yaml"):
        if dvc_yaml.is_file():
            try:
                stage = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).get(name)
            except (yaml.YAMLError, AttributeError):
                return None
            if not isinstance(stage, dict):
                return None
            return {"deps": _entries(stage.get("deps")), "params": _entries(stage.get("params")),
                    "outs": _entries(stage.get("outs")) + _entries(stage.get("metrics")) + _entries(stage.get("plots"))}
    return None


def _param(raw: dict, dotted: str):
    node = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def fingerprint(root: Path, name: str, params, extra: dict | None = None) -> tuple[str, list[str]] | None:
    """(hash of the stage's inputs, its output paths), or None when dvc.yaml does not describe the stage."""
    spec = stage_spec(root, name)
    if spec is None:
        return None
    raw = params.model_dump()
    deps = {dep: file_md5(CODE_ROOT / dep if dep.startswith("kdprune/") else Path(root) / dep) for dep in spec["deps"]}
    inputs = {"params": {key: _param(raw, key) for key in spec["params"]}, "deps": deps, "extra": extra or {}}
    digest = hashlib.md5(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return digest, spec["outs"]


def completed(root: Path, name: str, params, extra: dict | None = None) -> dict | None:
    """The summary of the stage's last run when its inputs and outputs are unchanged since; else None."""
    found = fingerprint(root, name, params, extra)
    path = record_path(root, name)
    if found is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        outputs_unchanged = all(file_md5(Path(root) / out) == md5 for out, md5 in record["outputs"].items())
        if record["inputs"] == found[0] and set(record["outputs"]) == set(found[1]) and outputs_unchanged:
            return record["summary"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # an unreadable record only means the stage runs again
    return None


def mark_done(root: Path, name: str, params, summary: dict, extra: dict | None = None) -> None:
    """Record that the stage finished with these inputs and outputs."""
    found = fingerprint(root, name, params, extra)
    if found is None:
        return
    outputs = {out: file_md5(Path(root) / out) for out in found[1]}
    if None in outputs.values():
        return  # an output is missing: nothing to resume from
    try:
        json.dumps(summary)
    except (TypeError, ValueError):
        return  # a summary that JSON cannot hold: the stage simply runs again next time
    write_json(record_path(root, name), {"stage": name, "inputs": found[0], "outputs": outputs, "summary": summary})
