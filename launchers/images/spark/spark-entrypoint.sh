#!/bin/bash
# Entry point of the Spark kernel image (pyspark's wheel has no kubernetes/dockerfiles/spark/entrypoint.sh).
#
# Spark's Kubernetes backend starts its pods with container args only:
#   driver --properties-file /opt/spark/conf/spark.properties --class org.apache.spark.deploy.PythonRunner <py> <args>
#       runs spark-submit in client mode inside the driver pod: the Python driver (our launcher) is the kernel.
#       The driver's host is the pod's IP (SPARK_DRIVER_BIND_ADDRESS, from status.podIP), so executors reach it
#       without DNS (any CNI); the API server is addressed by KUBERNETES_SERVICE_HOST:PORT unless the properties
#       set spark.kubernetes.driver.master (its default, kubernetes.default.svc, needs cluster DNS).
#   executor
#       runs Spark's Kubernetes executor backend from the environment Spark sets on executor pods:
#       SPARK_DRIVER_URL, SPARK_EXECUTOR_ID, SPARK_EXECUTOR_CORES, SPARK_EXECUTOR_MEMORY, SPARK_APPLICATION_ID,
#       SPARK_EXECUTOR_POD_IP, SPARK_EXECUTOR_POD_NAME, SPARK_RESOURCE_PROFILE_ID, SPARK_JAVA_OPT_<n>.
# Anything else runs as given (bootstrap-kernel.sh for a plain pod kernel).
set -euo pipefail

SPARK_HOME="${SPARK_HOME:?SPARK_HOME is not set}"
classpath="${SPARK_HOME}/jars/*"
if [ -n "${SPARK_CONF_DIR:-}" ]; then classpath="${SPARK_CONF_DIR}:${classpath}"; fi
if [ -n "${HADOOP_CONF_DIR:-}" ]; then classpath="${HADOOP_CONF_DIR}:${classpath}"; fi
if [ -n "${SPARK_EXTRA_CLASSPATH:-}" ]; then classpath="${classpath}:${SPARK_EXTRA_CLASSPATH}"; fi

# Kernels may run as any uid: give Spark, IPython and Jupyter a writable home.
if [ -z "${HOME:-}" ] || [ ! -w "${HOME}" ]; then
    HOME="${TMPDIR:-/tmp}/kernel-home-$(id -u)"
    mkdir -p "$HOME"
    export HOME
fi

case "${1:-}" in
    driver)
        shift
        : "${SPARK_DRIVER_BIND_ADDRESS:?SPARK_DRIVER_BIND_ADDRESS is not set (Spark sets it on driver pods)}"
        conf=(--conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS}"
              --conf "spark.driver.host=${SPARK_DRIVER_BIND_ADDRESS}"
              --conf "spark.executorEnv.SPARK_DRIVER_POD_IP=${SPARK_DRIVER_BIND_ADDRESS}")
        properties="${SPARK_CONF_DIR:-/opt/spark/conf}/spark.properties"
        if [ -n "${KUBERNETES_SERVICE_HOST:-}" ] && ! grep -qs '^spark\.kubernetes\.driver\.master[ =:]' "$properties"; then
            host="$KUBERNETES_SERVICE_HOST"
            case "$host" in *:*) host="[$host]" ;; esac  # IPv6
            conf+=(--conf "spark.kubernetes.driver.master=https://${host}:${KUBERNETES_SERVICE_PORT:-443}")
        fi
        exec "${SPARK_HOME}/bin/spark-submit" "${conf[@]}" --deploy-mode client "$@"
        ;;
    executor)
        shift
        java_opts=()
        # SPARK_JAVA_OPT_0, _1, ... in numeric order (each one whole option, spaces included)
        while IFS= read -r name; do
            java_opts+=("${!name}")
        done < <(compgen -e | grep '^SPARK_JAVA_OPT_[0-9]*$' | sort -t_ -k4 -n)
        exec java "${java_opts[@]}" -Xms"${SPARK_EXECUTOR_MEMORY}" -Xmx"${SPARK_EXECUTOR_MEMORY}" \
            -cp "$classpath" org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
            --driver-url "$SPARK_DRIVER_URL" \
            --executor-id "$SPARK_EXECUTOR_ID" \
            --cores "$SPARK_EXECUTOR_CORES" \
            --app-id "$SPARK_APPLICATION_ID" \
            --hostname "$SPARK_EXECUTOR_POD_IP" \
            --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID:-0}" \
            --podName "${SPARK_EXECUTOR_POD_NAME:-}" \
            "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
