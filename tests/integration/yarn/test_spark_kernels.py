"""Spark kernels on the real YARN cluster: spark-submit --deploy-mode cluster with our launcher as the driver.

The driver (our launcher and its kernel) runs in the application's AM container; ``spark`` in the kernel is
a live SparkSession whose executors are YARN containers. The pip ``pyspark`` package is the Spark
distribution (its directory is SPARK_HOME; its jars are used in place with ``spark.yarn.jars=local:``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers import PYTHON_LAUNCHER
from provisioners.specs import launcher_argv
from tests.integration.yarn import test_yarn_kernels as native
from tests.services.client import KernelWS, call, start_kernel
from tests.services.gateway import start_gateway, wait_until
from tests.services.kernel_checks import LISTENING_PORTS_WITH_PARENT, interrupt_busy_loop

pyspark = pytest.importorskip("pyspark")
yarn, proxy, instance, final_state = native.yarn, native.proxy, native.instance, native.final_state  # shared fixtures
pytestmark = pytest.mark.cluster
SPARK_HOME = str(Path(pyspark.__file__).parent)
PORTS = "44100..44199"
LOW, HIGH = (int(p) for p in PORTS.split(".."))
EG_PROXY = "enterprise_gateway.services.processproxies.yarn.YarnClusterProcessProxy"
EG_LAUNCHER = Path(__file__).resolve().parents[2] / "services" / "eg_style_launcher.py"


#: Spark settings for the test cluster: Spark's jars used in place (no upload of 400 MB per kernel), this
#: Python for the driver and executors, one small executor, no UI; Spark binds the node's address (else the
#: first non-loopback address it finds; the NM expands {{NM_HOST}} in env values)
SPARK_CONF = [
    f"spark.yarn.jars=local:{SPARK_HOME}/jars/*",
    f"spark.yarn.appMasterEnv.PYSPARK_PYTHON={sys.executable}", f"spark.executorEnv.PYSPARK_PYTHON={sys.executable}",
    "spark.yarn.appMasterEnv.SPARK_LOCAL_IP={{NM_HOST}}", "spark.executorEnv.SPARK_LOCAL_IP={{NM_HOST}}",
    "spark.executor.instances=1", "spark.executor.cores=1", "spark.executor.memory=512m", "spark.ui.enabled=false",
]


def spark_argv(conf: list[str] = SPARK_CONF) -> list[str]:
    return [f"{SPARK_HOME}/bin/spark-submit", "--master", "yarn", "--deploy-mode", "cluster", "--name", "{kernel_id}",
            *(arg for item in conf for arg in ("--conf", item)),
            *launcher_argv(sys.executable, str(PYTHON_LAUNCHER), token_on_stdin=False)[1:], "--spark-session"]


def eg_spark_spec(tmp_path: Path, config: dict, env: dict) -> dict:
    """An Enterprise Gateway YARN cluster-mode Spark kernelspec as EG ships them: bin/run.sh evaluates SPARK_OPTS
    (with client variables in it) and runs spark-submit with EG's launcher (here our EG-style stand-in)."""
    run_sh = tmp_path / "eg-bin" / "run.sh"
    run_sh.parent.mkdir(parents=True, exist_ok=True)
    run_sh.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "${EG_IMPERSONATION_ENABLED}" = "True" ]; then IMPERSONATION_OPTS="--proxy-user ${KERNEL_USERNAME}"; fi\n'
        f'eval exec "${{SPARK_HOME}}/bin/spark-submit" "${{SPARK_OPTS}}" "${{IMPERSONATION_OPTS}}" "{EG_LAUNCHER}" '
        '"${LAUNCH_OPTS}" "$@"\n')
    run_sh.chmod(0o755)
    spark_opts = ("--master yarn --deploy-mode cluster --name ${KERNEL_ID:-ERROR__NO__KERNEL_ID} "
                  "--conf spark.yarn.submit.waitAppCompletion=false "
                  "--conf spark.yarn.appMasterEnv.PYTHONUSERBASE=/home/${KERNEL_USERNAME}/.local "
                  "${KERNEL_EXTRA_SPARK_OPTS} " + " ".join(f"--conf {item}" for item in SPARK_CONF))
    eg_config = {"yarn_endpoint": config["rm_urls"][0],
                 **{k: v for k, v in config.items() if k not in ("rm_urls", "memory", "max_memory")}}
    return {"argv": [str(run_sh), "--RemoteProcessProxy.kernel-id", "{kernel_id}",
                     "--RemoteProcessProxy.response-address", "{response_address}",
                     "--RemoteProcessProxy.public-key", "{public_key}",
                     "--RemoteProcessProxy.port-range", "{port_range}",
                     "--RemoteProcessProxy.spark-context-initialization-mode", "eager"],
            "display_name": "Spark - Python (YARN Cluster Mode)", "language": "python",
            "env": {**env, "SPARK_OPTS": spark_opts, "LAUNCH_OPTS": ""},
            "metadata": {"process_proxy": {"class_name": EG_PROXY, "config": eg_config}}}


def write_spark_specs(tmp_path, yarn, proxy, instance, cluster_env, **overrides) -> Path:
    """Kernelspecs 'spark', 'spark-broken' (the driver's Python is missing) and 'eg-spark' under the returned path."""
    config = {"rm_urls": [proxy.url], "memory": "1g", "max_memory": "2g", "port_range": PORTS,
              "instance_name": instance, "poll_interval": 0.5, "launch_timeout": 240,
              "response_host": yarn.gateway_address, **overrides}
    env = {"SPARK_HOME": SPARK_HOME, "SPARK_LOCAL_IP": yarn.gateway_address, **cluster_env}
    broken = [item.replace(sys.executable, "/nonexistent/python") if "appMasterEnv.PYSPARK" in item else item
              for item in SPARK_CONF]
    specs = {name: {"argv": argv, "display_name": "Spark on YARN", "language": "python", "interrupt_mode": "message",
                    "env": env, "metadata": {"kernel_provisioner": {"provisioner_name": "yarn-spark-provisioner",
                                                                    "config": config},
                                             "supported_encryption": ["curve"]}}
             for name, argv in (("spark", spark_argv()), ("spark-broken", spark_argv(broken)))}
    specs["eg-spark"] = eg_spark_spec(tmp_path, config, env)
    for name, spec in specs.items():
        spec_dir = tmp_path / "data" / "kernels" / name
        spec_dir.mkdir(parents=True)
        spec_dir.joinpath("kernel.json").write_text(json.dumps(spec))
    return tmp_path / "data"


def spark_gateway(tmp_path, yarn, proxy, instance, cluster_env, **overrides):
    data = write_spark_specs(tmp_path, yarn, proxy, instance, cluster_env, **overrides)
    return start_gateway(tmp_path=tmp_path, env={"JUPYTER_PATH": str(data), "GATEWAY_KERNEL_LAUNCH_TIMEOUT": "300",
                                                 "GATEWAY_ACCEPT_ENTERPRISE_GATEWAY": "true"}, timeout=60)


def test_spark_kernel_runs_on_yarn_executors(tmp_path, yarn_cluster, yarn, proxy, instance):
    gw = spark_gateway(tmp_path, yarn, proxy, instance, yarn_cluster.env)
    try:
        started = time.monotonic()
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "spark", "env": {
            "KERNEL_USERNAME": "alice", "KERNEL_SECRETIVE": "x'\"$(id)`id`"}}, timeout=300)
        assert status == 201, body
        kid = body["id"]
        print(f"spark kernel start-to-ready {time.monotonic() - started:.1f}s")
        # the spec declares CurveZMQ: the driver's launcher got --curve and reported its public key (issue 12)
        assert "curve_publickey" in json.loads((tmp_path / "runtime" / f"kernel-{kid}.json").read_text())
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
            ports = eval(ws.run(LISTENING_PORTS_WITH_PARENT)[0])  # the kernel's and the driver JVM's
            assert len(ports) >= 6 and [p for p in ports if not LOW <= p <= HIGH] == [], ports
            out, _ = ws.run("print(sc.getConf().get('spark.driver.port'), "
                            "sc._jsc.sc().env().blockManager().blockManagerId().port())")
            assert all(LOW <= int(port) <= HIGH for port in out.split()), out  # also when bound to loopback
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


def test_enterprise_gateway_spark_kernelspec(tmp_path, yarn_cluster, yarn, proxy, instance):
    """EG's run.sh evaluates SPARK_OPTS; a client's KERNEL_* text substituted into it would run on the gateway."""
    marker = tmp_path / "pwned"
    gw = spark_gateway(tmp_path, yarn, proxy, instance, yarn_cluster.env)
    try:
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "eg-spark", "env": {
            "KERNEL_USERNAME": "alice", "KERNEL_EXTRA_SPARK_OPTS": f"$(touch {marker}) `touch {marker}`"}}, timeout=300)
        assert status == 201, body
        kid = body["id"]
        app = yarn.kernel_app(instance, kid)
        assert app and app["state"] == "RUNNING" and f"kg-kernel:{kid}" in app["applicationTags"].split(","), app
        with KernelWS(gw, kid) as ws:
            out, _ = ws.run("import os; print(spark.range(10).groupBy().sum().collect()[0][0], "
                            "os.environ['PYTHONUSERBASE'], spark.sparkContext.getConf().get('spark.driver.port'))",
                            timeout=240)
            total, userbase, driver_port = out.split()
            assert (total, userbase) == ("45", "/home/alice/.local") and LOW <= int(driver_port) <= HIGH, out
        assert call(gw, "DELETE", f"/api/kernels/{kid}", timeout=120)[0] == 204
        assert final_state(yarn, app["id"])["state"] in ("FINISHED", "KILLED")
        assert not marker.exists(), "a client's KERNEL_EXTRA_SPARK_OPTS was executed by run.sh's eval"
    finally:
        gw.stop()


def test_impersonation_and_orphans_of_a_killed_gateway(tmp_path, yarn_cluster, yarn, proxy, instance):
    first = spark_gateway(tmp_path / "a", yarn, proxy, instance, yarn_cluster.env, impersonate=True)
    status, body, _ = call(first, "POST", "/api/kernels", {"name": "spark", "env": {"KERNEL_USERNAME": "bob;id"}})
    assert status == 400 and "not a valid user name" in body["message"], body
    kid = start_kernel(first, "spark", env={"KERNEL_USERNAME": "bob"}, timeout=300)
    orphan = yarn.kernel_app(instance, kid)
    assert orphan["user"] == "bob" and orphan["state"] == "RUNNING", orphan  # spark-submit --proxy-user bob
    with KernelWS(first, kid) as ws:  # the launch secret came as a localized file, read and unlinked
        assert ws.run("import os; print(os.path.exists('kg-launch.creds'), spark.sparkContext.sparkUser())",
                      timeout=120)[0].split() == ["False", "bob"]
    first.stop(signal.SIGKILL)
    second = spark_gateway(tmp_path / "b", yarn, proxy, instance, yarn_cluster.env)
    try:
        kid = start_kernel(second, "spark", timeout=300)
        assert final_state(yarn, orphan["id"])["state"] == "KILLED"
        assert [a["name"] for a in yarn.apps(instance)] == [kid]
        assert "left by an earlier run" in second.log()
        assert call(second, "DELETE", f"/api/kernels/{kid}", timeout=120)[0] == 204
    finally:
        second.stop()
        if yarn.app(orphan["id"])["state"] not in native.FINAL:  # never leave an application behind
            yarn.rest("PUT", f"/apps/{orphan['id']}/state", {"state": "KILLED"})


def test_full_queue_is_refused_with_yarns_numbers(tmp_path, yarn_cluster, yarn, proxy, instance):
    """The queue's AM share is held by applications whose AM never registers; a Spark kernel then gets 503."""
    am_limit, largest = yarn.queue_limits()
    holders, used = [], 0
    try:
        while am_limit - used >= 512:  # YARN's smallest container here
            app_id = yarn.rest("POST", "/apps/new-application")["application-id"]
            yarn.rest("POST", "/apps", {"application-id": app_id, "application-name": "holder", "queue": "default",
                                        "resource": {"memory": min(largest, am_limit - used), "vCores": 1},
                                        "am-container-spec": {"commands": {"command": "sleep 600"}}})
            holders.append(app_id)
            # allocatedMB is -1 until the application is scheduled, then its containers' memory
            used += wait_until(lambda a=app_id: max(yarn.app(a)["allocatedMB"], 0), 120, what=f"{app_id} AM container")
        gw = spark_gateway(tmp_path, yarn, proxy, instance, yarn_cluster.env, queue_wait=0.5)
        try:
            started = time.monotonic()
            status, body, _ = call(gw, "POST", "/api/kernels", {"name": "spark", "env": {"KERNEL_LAUNCH_TIMEOUT": "40"}},
                                   timeout=200)
            elapsed = time.monotonic() - started
            assert status == 503, body
            assert "AM resource limit exceeded" in body["message"] and f"memory:{am_limit}" in body["message"], body
            assert 19 <= elapsed < 60, elapsed  # half of the 40 s launch timeout, then a poll and the kill
            killed = yarn.apps(instance, states="NEW,NEW_SAVING,SUBMITTED,ACCEPTED,RUNNING,KILLED")
            assert [a["state"] for a in killed] == ["KILLED"], killed
        finally:
            gw.stop()
    finally:
        for app_id in holders:
            yarn.rest("PUT", f"/apps/{app_id}/state", {"state": "KILLED"})


# one loop for every in-process YARN test: the provisioners' response listener and RM watcher are per process
@pytest.mark.asyncio(loop_scope="session")
async def test_installed_spec_and_a_later_manager_reattaching(tmp_path, yarn_cluster, yarn, proxy, instance, monkeypatch):
    """A spec from ``specs install yarn-spark`` starts; a later manager re-attaches to it from provisioner info."""
    from jupyter_client.manager import AsyncKernelManager

    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "kernel_gateway", "specs", "install", "yarn-spark", "--name", "spark",
                    "--prefix", str(prefix), "--python", sys.executable, "--rm-urls", proxy.url,
                    "--spark-home", SPARK_HOME, "--hadoop-conf-dir", yarn_cluster.env["HADOOP_CONF_DIR"],
                    "--memory", "1g", "--port-range", PORTS, *(a for c in SPARK_CONF for a in ("--spark-conf", c))],
                   check=True, capture_output=True, timeout=60)
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share/jupyter"))
    for key, value in {"GATEWAY_INSTANCE_NAME": instance, "GATEWAY_YARN_POLL_INTERVAL": "0.5",
                       "GATEWAY_RESPONSE_HOST": yarn.gateway_address, "SPARK_LOCAL_IP": yarn.gateway_address}.items():
        monkeypatch.setenv(key, value)
    first = AsyncKernelManager(kernel_name="spark")
    await first.start_kernel()
    await native.reattach_and_run(yarn, first, "assert spark.range(4).count() == 4", timeout=120)
