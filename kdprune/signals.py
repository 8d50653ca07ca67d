"""Process signals shared by the drivers (CLI, Prefect flow): no driver imports another for them."""

from __future__ import annotations

import sys


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so open tracking runs are closed (marked FAILED), never left RUNNING."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
