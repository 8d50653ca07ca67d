#!/bin/bash
# The GPU check in one prepared script: bench/bench.py on the full CIFAR-10 JPEG set, seed recipe vs profile.
# Run from anywhere in the checkout on the GPU machine (Python 3.12 with torch + torchvision preinstalled), with
# the ignored folder .gpu/ carried alongside the checkout:
#   .gpu/cifar10-jpg.tar.gz   the 60k archive (cp ../shared/data/cifar10-jpg.tar.gz .gpu/)
#   .gpu/wheels/*.whl         what the machine lacks: torch-pruning, pydantic, optuna and their deps (bench/README.md)
# Extra arguments go to bench.py (e.g. --profile FILE). Results: $OUT/bench.json and $OUT/bench.log when the
# device tool sets $OUT, else bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."

site=/tmp/kdprune-site                    # stays while the machine is warm: a rerun skips the install
if [ ! -f "$site/.installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/wheels/*.whl
  touch "$site/.installed"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export KDPRUNE_TRACKING=off PYTHONUNBUFFERED=1

out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, torch_pruning, pydantic, optuna; print('python', __import__('sys').version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
# per-epoch progress goes to stderr (bench.log); the table and the targets to stdout
python3 bench/bench.py --device cuda --data .gpu/cifar10-jpg.tar.gz --out "$out/bench.json" "$@" 2> "$out/bench.log" \
  || { status=$?; tail -n 40 "$out/bench.log"; exit $status; }
