"""Spark kernels on the real YARN cluster: spark-submit --deploy-mode cluster with our launcher as the driver.

The driver (our launcher and its kernel) runs in the application's AM container; ``spark`` in the kernel is
a live SparkSession whose executors are YARN containers. The pip ``pyspark`` package is the Spark
distribution (its directory is SPARK_HOME; its jars are used in place with ``spark.yarn.jars=local:``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from launchers import PYTHON_LAUNCHER
from provisioners.specs import launcher_argv
from tests.integration.yarn import test_yarn_kernels as native
from tests.services.client import KernelWS, call
from tests.services.gateway import start_gateway
from tests.services.kernel_checks import interrupt_busy_loop

pyspark = pytest.importorskip("pyspark")
yarn, proxy, instance, final_state = native.yarn, native.proxy, native.instance, native.final_state  # shared fixtures
pytestmark = pytest.mark.cluster
SPARK_HOME = str(Path(pyspark.__file__).parent)
PORTS = "44100..44199"


def spark_argv() -> list[str]:
    launcher = [a for a in launcher_argv(sys.executable, str(PYTHON_LAUNCHER))[1:] if a != "--launch-token-stdin"]
    return [
        f"{SPARK_HOME}/bin/spark-submit", "--master", "yarn", "--deploy-mode", "cluster", "--name", "{kernel_id}",
        "--conf", f"spark.yarn.jars=local:{SPARK_HOME}/jars/*",  # no upload of 400 MB of jars per kernel
        "--conf", f"spark.yarn.appMasterEnv.PYSPARK_PYTHON={sys.executable}",
        "--conf", f"spark.executorEnv.PYSPARK_PYTHON={sys.executable}",
        # else Spark binds the first non-loopback address it finds; the NM expands {{NM_HOST}} in env values
        "--conf", "spark.yarn.appMasterEnv.SPARK_LOCAL_IP={{NM_HOST}}",
        "--conf", "spark.executorEnv.SPARK_LOCAL_IP={{NM_HOST}}",
        "--conf", "spark.executor.instances=1", "--conf", "spark.executor.cores=1", "--executor-memory", "512m",
        "--conf", "spark.ui.enabled=false",
        *launcher, "--spark-session",
    ]


def spark_gateway(tmp_path, yarn, proxy, instance, cluster_env):
    config = {"rm_urls": [proxy.url], "memory": "1g", "max_memory": "2g", "port_range": PORTS,
              "instance_name": instance, "poll_interval": 0.5, "launch_timeout": 240,
              "response_host": yarn.gateway_address}
    env = {"SPARK_HOME": SPARK_HOME, "SPARK_LOCAL_IP": yarn.gateway_address, **cluster_env}
    broken = spark_argv()
    broken[broken.index(f"spark.yarn.appMasterEnv.PYSPARK_PYTHON={sys.executable}")] = \
        "spark.yarn.appMasterEnv.PYSPARK_PYTHON=/nonexistent/python"
    for name, argv in (("spark", spark_argv()), ("spark-broken", broken)):
        spec_dir = tmp_path / "data" / "kernels" / name
        spec_dir.mkdir(parents=True)
        spec_dir.joinpath("kernel.json").write_text(json.dumps({
            "argv": argv, "display_name": "Spark on YARN", "language": "python", "interrupt_mode": "message",
            "env": env, "metadata": {"kernel_provisioner": {"provisioner_name": "yarn-spark-provisioner", "config": config}},
        }))
    return start_gateway(tmp_path=tmp_path, env={"JUPYTER_PATH": str(tmp_path / "data"),
                                                 "GATEWAY_KERNEL_LAUNCH_TIMEOUT": "300"}, timeout=60)


def test_spark_kernel_runs_on_yarn_executors(tmp_path, yarn_cluster, yarn, proxy, instance):
    gw = spark_gateway(tmp_path, yarn, proxy, instance, yarn_cluster.env)
    try:
        started = time.monotonic()
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "spark", "env": {
            "KERNEL_USERNAME": "alice", "KERNEL_SECRETIVE": "x'\"$(id)`id`"}}, timeout=300)
        assert status == 201, body
        kid = body["id"]
        print(f"spark kernel start-to-ready {time.monotonic() - started:.1f}s")
        app = yarn.kernel_app(instance, kid)
        assert app and app["state"] == "RUNNING" and app["applicationType"] == "SPARK", app
        assert set(app["applicationTags"].split(",")) >= {"kernel_gateway", f"kg-kernel:{kid}", "kg-user:alice"}
        with KernelWS(gw, kid) as ws:
            out, _ = ws.run("print(spark.range(10).groupBy().sum().collect()[0][0], spark.sparkContext.master, "
                            "spark.sparkContext.applicationId)", timeout=240)
            total, master, app_id = out.split()
            assert (total, master, app_id) == ("45", "yarn", app["id"])
            out, _ = ws.run("import os, json; print(json.dumps([os.environ['KERNEL_SECRETIVE'], "
                            "os.path.exists(os.environ['HADOOP_TOKEN_FILE_LOCATION'])]))")
            assert json.loads(out) == ["x'\"$(id)`id`", False]
            out, _ = ws.run("print(len(sc._jsc.sc().statusTracker().getExecutorInfos()) - 1)")
            assert int(out) >= 1, "the sum should have run on YARN executors"
            interrupt_busy_loop(gw, ws, kid)
            status, body, _ = call(gw, "POST", f"/api/kernels/{kid}/restart", timeout=300)
            assert status == 200 and body["id"] == kid, body
            assert final_state(yarn, app["id"])["state"] in ("KILLED", "FINISHED")
            assert ws.run("print(spark.range(5).count())", timeout=240)[0].strip() == "5"
        restarted = yarn.kernel_app(instance, kid)
        assert restarted and restarted["id"] != app["id"], "restart should run a new application"
        app = restarted
        assert call(gw, "DELETE", f"/api/kernels/{kid}", timeout=120)[0] == 204
        assert final_state(yarn, app["id"])["state"] in ("FINISHED", "KILLED")
        assert not yarn.apps(instance)
    finally:
        gw.stop()


def test_failing_driver_reports_yarn_diagnostics(tmp_path, yarn_cluster, yarn, proxy, instance):
    gw = spark_gateway(tmp_path, yarn, proxy, instance, yarn_cluster.env)
    try:
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "spark-broken"}, timeout=300)
        assert status == 502, body
        assert "FAILED" in body["message"] and "/nonexistent/python" in body["message"], body["message"]
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "spark", "env": {"KERNEL_QUEUE": "other"}})
        assert status == 400 and "KERNEL_QUEUE" in body["message"], body
        assert not yarn.apps(instance)
    finally:
        gw.stop()
