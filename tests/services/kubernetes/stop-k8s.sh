#!/usr/bin/env bash
# Stop the Kubernetes test cluster recorded in /tmp/kgw-k8s.json (started by start-k8s.sh or left by a crashed
# test session): the node, its pods, the control plane, then its mounts, iptables chains and rules, bridge,
# node IP and cgroups. Logs and certificates stay in the work directory; images stay in containerd's store.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$REPO" && exec "$REPO/.venv/bin/python" -m tests.services.kubernetes_cluster stop "$@"
