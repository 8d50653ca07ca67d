#!/usr/bin/env bash
# Start a real Prefect server on 127.0.0.1:PORT in the background (schedules need one), pid in .prefect-server.pid.
#   usage:    bash scripts/prefect-server.sh [PORT]      (default: $PREFECT_SERVER_PORT, else 4200)
#   stop it:  kill "$(cat .prefect-server.pid)"
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${1:-${PREFECT_SERVER_PORT:-4200}}
case "$PORT" in ''|*[!0-9]*) echo "prefect-server.sh: PORT must be a number, got '$PORT'" >&2; exit 2 ;; esac
source scripts/env.sh
sh -c 'echo $$ > .prefect-server.pid; exec prefect server start --host 127.0.0.1 --port "$1"' sh "$PORT" > .prefect-server.log 2>&1 &
for _ in $(seq 60); do
  if curl -fs "http://127.0.0.1:$PORT/api/health" > /dev/null; then
    echo "Prefect server up: export PREFECT_API_URL=http://127.0.0.1:$PORT/api"; exit 0
  fi
  sleep 1
done
echo "Prefect server did not become healthy on port $PORT; see .prefect-server.log" >&2; exit 1
