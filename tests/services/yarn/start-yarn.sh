#!/usr/bin/env bash
# Start the YARN test cluster by hand (the tests start their own through tests/services/yarn_cluster.py):
#   1 ResourceManager (http://127.0.0.1:18088, or 10.198.7.1 with a netns node) + 1 or 2 NodeManagers,
#   Hadoop 3.4.1 jars from Maven Central cached in ${KGW_CACHE_DIR:-/var/cache/kgw}/yarn-3.4.1.
# Prints (and writes to <workdir>/env.sh) HADOOP_CONF_DIR, YARN_CONF_DIR, YARN_RM_URL.
#   start-yarn.sh [--nodes 1|2] [--no-netns] [--workdir DIR (default /tmp/kgw-yarn-cluster)]
#                 [--port-base 18030] [--web-port 18088]
# A test session that needs the cluster's ports removes a cluster started this way.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
PY="$REPO/.venv/bin/python"; [ -x "$PY" ] || PY=python3   # the module needs only the standard library
cd "$REPO" && exec "$PY" -m tests.services.yarn_cluster start "$@"
