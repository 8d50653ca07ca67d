"""Writing outputs so that a failure never leaves a half-written file behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kdprune.errors import KdpruneError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        if error.filename is None:  # a failed write() names no file: name the output it was for
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise
    except RuntimeError as error:  # torch.save reports a full disk as "PytorchStreamWriter failed writing file"
        if shutil.disk_usage(path.parent).free < 1 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from error
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _remove_orphans(path: Path) -> None:
    """Delete temporary siblings of `path` whose writer died without cleaning up (kill -9)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        try:
            os.kill(int(pid), 0)
        except (ValueError, PermissionError):
            continue  # not ours, or alive under another user
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, what: str = "a JSON object") -> dict:
    """A JSON object from a file the pipeline wrote; a missing, garbled or non-object file is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise KdpruneError(f"{path}: not found; run the stage that writes it first")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise KdpruneError(f"{path}: not valid JSON ({str(error).splitlines()[0]}); run the stage that writes it again") from None
    if not isinstance(data, dict):
        raise KdpruneError(f"{path}: expected {what}, got {type(data).__name__}; run the stage that writes it again")
    return data


def json_field(path: str | Path, data: dict, *keys: str, kind: type | tuple = (int, float)):
    """data[k1][k2]... checked for presence and type; an error names the file and the field."""
    node = data
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise KdpruneError(f"{path}: missing field {'.'.join(keys[:depth + 1])!r}; run the stage that writes it again")
        node = node[key]
    if not isinstance(node, kind) or (isinstance(node, bool) and kind == (int, float)):
        raise KdpruneError(f"{path}: field {'.'.join(keys)!r} has a wrong type ({type(node).__name__}: {node!r:.40}); "
                           "run the stage that writes it again")
    return node
