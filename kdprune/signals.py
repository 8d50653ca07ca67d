"""Process signals shared by the drivers (CLI, Prefect flow): no driver imports another for them."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

_depth = 0  # nesting of deferred_signals() blocks on the main thread
_pending: int | None = None  # a signal that arrived inside one, raised when the outermost block ends


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    sys.exit(128 + signum)


def _handler(signum: int, frame) -> None:
    global _pending
    if _depth:
        _pending = signum  # inside a store write: let it finish (see deferred_signals)
        return
    _raise_for(signum)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(143) and SIGINT into KeyboardInterrupt, so open tracking runs are closed
    (FAILED / KILLED), never left RUNNING; held while a store write is under way (`deferred_signals`).

    SIGINT is set explicitly even when it was inherited as ignored: a non-interactive shell starts background jobs
    (`kdprune run &` in a script, a CI step) with SIGINT ignored, and Python then installs no handler, so a SIGINT
    sent to stop the run would be dropped while it trains on."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then raise them. A SQLite write interrupted half-way leaves its
    transaction open, so the database stays locked by this very process: closing the runs then waited on the lock
    (20 s per try) and the run did not stop. The writes are milliseconds long; only the main thread gets signals."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            _raise_for(signum)
