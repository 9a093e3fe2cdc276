#!/usr/bin/env bash
# Stop the YARN test cluster recorded in /tmp/kgw-yarn-<web port>.json: kill live applications through the RM,
# stop the daemons (SIGKILL; --graceful: SIGTERM, ~20 s), SIGKILL leftover container processes, delete
# the network namespace. Logs stay in the work directory.
#   stop-yarn.sh [--graceful] [--web-port 18088]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
PY="$REPO/.venv/bin/python"; [ -x "$PY" ] || PY=python3
cd "$REPO" && exec "$PY" -m tests.services.yarn_cluster stop "$@"
