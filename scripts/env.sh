# Sourced by the project's scripts: telemetry off for every tool, the project's venv first on PATH.
export PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin:$PATH"
eval "$(python -m kdprune.telemetry)"   # the switches are defined once, in kdprune/telemetry.py
