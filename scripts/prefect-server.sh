#!/usr/bin/env bash
# Start a real Prefect server on 127.0.0.1:4200 in the background (schedules need one), pid in .prefect-server.pid.
#   stop it:  kill "$(cat .prefect-server.pid)"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
sh -c 'echo $$ > .prefect-server.pid; exec prefect server start --host 127.0.0.1 --port 4200' > .prefect-server.log 2>&1 &
for _ in $(seq 60); do
  if curl -fs http://127.0.0.1:4200/api/health > /dev/null; then
    echo "Prefect server up: export PREFECT_API_URL=http://127.0.0.1:4200/api"; exit 0
  fi
  sleep 1
done
echo "Prefect server did not become healthy; see .prefect-server.log" >&2; exit 1
