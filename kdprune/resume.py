"""Resume: a stage whose inputs and outputs are unchanged since it last finished is not run again.

When a stage finishes, a record (`.kdprune/stages/NAME.json`) keeps a fingerprint of its inputs and the hashes of
its outputs. The inputs are those of kdprune/stage_inputs.py, the table dvc.yaml is written from: its params, its
upstream files in the project, the code that runs (wherever it is installed) and, for `prepare`, the data source
wherever it lives. A stage is up to date when its record's fingerprint equals the current one and every output
still has its recorded hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import kdprune
from kdprune.io import write_json
from kdprune.stage_inputs import PACKAGE, table

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


def _dep_path(root: Path, dep: str) -> Path:
    """The code (`kdprune`, `kdprune/NAME.py`) is where it runs from; every other dep is inside the project."""
    return CODE_ROOT / dep if dep == PACKAGE or dep.startswith(PACKAGE + "/") else Path(root) / dep


def data_source_path(root: Path, params) -> Path | None:
    """The files behind `data.path` (relative to the project), or None when the data has no path (digits)."""
    if not params.data.path:
        return None
    path = Path(params.data.path).expanduser()
    return path if path.is_absolute() else Path(root) / path


def _param(raw: dict, dotted: str):
    node = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def fingerprint(root: Path, name: str, params, extra: dict | None = None) -> tuple[str, list[str]]:
    """(hash of the stage's inputs, its output paths)."""
    stage = table()[name]
    raw = params.model_dump()
    deps = {dep: file_md5(_dep_path(root, dep)) for dep in stage.deps}
    if stage.data_source and (source := data_source_path(root, params)) is not None:
        deps["data.path"] = file_md5(source)
    inputs = {"params": {key: _param(raw, key) for key in stage.params}, "deps": deps, "extra": extra or {}}
    digest = hashlib.md5(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return digest, stage.outputs()


def completed(root: Path, name: str, params, extra: dict | None = None) -> dict | None:
    """The summary of the stage's last run when its inputs and outputs are unchanged since; else None."""
    found = fingerprint(root, name, params, extra)
    path = record_path(root, name)
    if not path.is_file():
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
    outputs = {out: file_md5(Path(root) / out) for out in found[1]}
    if None in outputs.values():
        return  # an output is missing: nothing to resume from
    try:
        json.dumps(summary)
    except (TypeError, ValueError):
        return  # a summary that JSON cannot hold: the stage simply runs again next time
    write_json(record_path(root, name), {"stage": name, "inputs": found[0], "outputs": outputs, "summary": summary})
