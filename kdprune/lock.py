"""One pipeline run per project at a time: an exclusive lock on `.kdprune.lock` in the project folder.

The lock is an OS file lock (flock), so the kernel releases it when its holder dies, even by kill -9: a stale lock
from a dead process is simply taken over. The file holds the holder's pid and start time for the refusal message.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kdprune.errors import KdpruneError

LOCK_NAME = ".kdprune.lock"
_held: set[Path] = set()  # locks this process holds: the CLI's lock covers the flow it starts


class ProjectBusy(KdpruneError):
    """Another kdprune process holds the project's lock."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info['pid']} ({info['command']}), started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def project_lock(root: str | Path, command: str) -> Iterator[Path]:
    """Hold the project's lock for the block; raise ProjectBusy at once when another process holds it."""
    path = (Path(root) / LOCK_NAME).resolve()
    if path in _held:
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ProjectBusy(f"{path.parent}: another kdprune run is using this project ({_holder(path)}); "
                              "wait for it, or run in a separate project folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command,
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode(), 0)
        _held.add(path)
        try:
            yield path
        finally:
            _held.discard(path)
    finally:
        os.close(fd)  # releases the flock


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ')' may hold spaces


def process_token(pid: int | None = None) -> str:
    """'pid:start' naming this process (or `pid`) uniquely on this machine, for tags that outlive it."""
    pid = pid or os.getpid()
    return f"{pid}:{_start_ticks(pid) or ''}"


def process_alive(token: str) -> bool:
    """Whether the process a `process_token` named is still running (not merely its pid reused)."""
    pid_text, _, start = token.partition(":")
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return not start or _start_ticks(pid) in (start, None)
