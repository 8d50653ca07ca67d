"""The tools' telemetry switches, defined once: the CLI sets them, the tests import them, and
scripts/env.sh exports them with `eval "$(python -m kdprune.telemetry)"`."""

from __future__ import annotations

import os

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",  # MLflow accepts only "true"
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}


def switch_off() -> None:
    """Telemetry off for this process and its children, unless the user set a switch explicitly."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


if __name__ == "__main__":
    print("\n".join(f"export {key}={value}" for key, value in TELEMETRY_OFF.items()))
