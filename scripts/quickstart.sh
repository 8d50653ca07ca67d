#!/usr/bin/env bash
# Set up (.venv) and run the whole pipeline on the embedded default (scikit-learn's digits, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec kdprune run "$@"
