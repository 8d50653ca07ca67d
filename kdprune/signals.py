"""Process signals shared by the drivers (CLI, Prefect flow): no driver imports another for them."""

from __future__ import annotations

import sys


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so open tracking runs are closed (marked FAILED), never left RUNNING, and make
    SIGINT a KeyboardInterrupt (runs marked KILLED) even when it was inherited as ignored: a non-interactive shell
    starts background jobs (`kdprune run &` in a script, a CI step) with SIGINT ignored, and Python then installs
    no handler, so a SIGINT sent to stop the run would be dropped while it trains on."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        signal.signal(signal.SIGINT, signal.default_int_handler)
