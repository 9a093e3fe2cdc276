#!/usr/bin/env bash
# Start the Kubernetes test cluster by hand (the tests start their own through tests/services/kubernetes_cluster.py):
#   etcd, kube-apiserver (https://127.0.0.1:6443), controller-manager, scheduler, containerd, kubelet and
#   kube-proxy of Kubernetes v1.34, built once into ${KGW_CACHE_DIR:-/var/cache/kgw}/kubernetes-<version>.
# Prints (and writes to <workdir>/env.sh) KUBECONFIG, KERNEL_IMAGE and a PATH with kubectl, crictl and helm.
#   start-k8s.sh [--workdir DIR (default /tmp/kgw-k8s-cluster)]
# A test session removes a cluster started this way before it starts its own. Needs root.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$REPO" && exec "$REPO/.venv/bin/python" -m tests.services.kubernetes_cluster start "$@"
