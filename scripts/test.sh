#!/usr/bin/env bash
# Set up (.venv) and run the test suite (all of it, slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec python -m pytest -q --durations=15 "$@"   # the 15 slowest tests close the report
