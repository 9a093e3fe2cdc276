"""Native YARN kernels on a real ResourceManager and NodeManager, through the gateway.

Every gateway here reaches the RM through :class:`CountingProxy`, a small HTTP relay that counts the
requests the gateway makes, so the tests can show that watching kernels costs one batched query per
poll interval, and (with a closed port listed first) that the provisioner follows the next RM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launchers import PYTHON_LAUNCHER
from provisioners.specs import launcher_argv
from tests.services.client import KernelWS, call, start_kernel
from tests.services.counting_proxy import CountingProxy
from tests.services.gateway import free_port, start_gateway, wait_until
from tests.services.kernel_checks import LISTENING_PORTS, interrupt_busy_loop

pytestmark = pytest.mark.cluster
PORTS = "44000..44099"
LOW, HIGH = (int(p) for p in PORTS.split(".."))
FINAL = ("FINISHED", "FAILED", "KILLED")
LIVE = "NEW,NEW_SAVING,SUBMITTED,ACCEPTED,RUNNING"


class Yarn:
    """Where the cluster is: its RM web address, the command that runs a registering ApplicationMaster, and
    the address of this machine that containers on every node reach (the RM is reached through a proxy)."""

    def __init__(self, rm_url: str, am_command: str, gateway_address: str) -> None:
        self.rm_url = rm_url.rstrip("/")
        self.am_command = am_command
        self.gateway_address = gateway_address

    def rest(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(self.rm_url + "/ws/v1/cluster" + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=15) as response:
            text = response.read()
        return json.loads(text) if text else {}

    def app(self, app_id: str) -> dict:
        return self.rest("GET", f"/apps/{app_id}")["app"]

    def apps(self, instance: str, states: str = LIVE) -> list[dict]:
        found = self.rest("GET", f"/apps?states={states}&applicationTags=kg-instance:{instance}")
        return (found.get("apps") or {}).get("app") or []

    def kernel_app(self, instance: str, kernel_id: str, states: str = LIVE) -> dict | None:
        return next((a for a in self.apps(instance, states) if a["name"] == kernel_id), None)

    def queue_limits(self, queue: str = "default") -> tuple[int, int]:
        """The queue's AM resource limit and the largest container, in MB."""
        info = self.rest("GET", "/scheduler")["scheduler"]["schedulerInfo"]
        [found] = [q for q in info["queues"]["queue"] if q["queueName"] == queue]
        return found["AMResourceLimit"]["memory"], self.rest("POST", "/apps/new-application")[
            "maximum-resource-capability"]["memory"]


@pytest.fixture(scope="session")
def yarn(yarn_cluster, yarn_am_command) -> Yarn:
    return Yarn(yarn_cluster.rm_url, yarn_am_command, yarn_cluster.gateway_address)


@pytest.fixture
def proxy(yarn):
    server = CountingProxy(yarn.rm_url)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def instance() -> str:
    return f"kgw-yarn-{uuid.uuid4().hex[:8]}"


def write_spec(root: Path, name: str, config: dict, argv: list[str] | None = None) -> None:
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv or launcher_argv(sys.executable, str(PYTHON_LAUNCHER)), "display_name": f"YARN {name}",
            "language": "python", "interrupt_mode": "message",
            "metadata": {"kernel_provisioner": {"provisioner_name": "yarn-provisioner", "config": config}}}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def yarn_gateway(tmp_path, yarn, proxy, instance, rm_urls=None, only_yarn: dict | None = None, **config):
    """A gateway with kernelspecs 'yarn', 'broken' and 'exits'; ``only_yarn``: options of the 'yarn' spec alone."""
    base = {"rm_urls": rm_urls or [proxy.url], "am_command": yarn.am_command, "memory": "384m", "max_memory": "4g",
            "port_range": PORTS, "instance_name": instance, "poll_interval": 0.5, "launch_timeout": 90,
            "allowed_queues": ["nosuchqueue"], "response_host": yarn.gateway_address}
    base.update(config)
    write_spec(tmp_path / "data", "yarn", {**base, **(only_yarn or {})})
    write_spec(tmp_path / "data", "broken", {**base, "am_command": "/nonexistent/java-am"})
    write_spec(tmp_path / "data", "exits", base, argv=["/bin/sh", "-c", "echo launcher-boom >&2; exit 3"])
    return start_gateway(tmp_path=tmp_path, env={"JUPYTER_PATH": str(tmp_path / "data"),
                                                 "GATEWAY_KERNEL_LAUNCH_TIMEOUT": "120"}, timeout=60)


def final_state(yarn, app_id, timeout=60):
    return wait_until(lambda: (a := yarn.app(app_id))["state"] in FINAL and a, timeout, 0.2, f"{app_id} final")


def test_native_kernel_lifecycle(tmp_path, yarn, proxy, instance):
    gw = yarn_gateway(tmp_path, yarn, proxy, instance)
    try:
        kid = start_kernel(gw, "yarn", env={"KERNEL_USERNAME": "Alice", "KERNEL_MEMORY": "512m"})
        app = yarn.kernel_app(instance, kid)
        assert app and app["state"] == "RUNNING", app
        assert set(app["applicationTags"].split(",")) >= {"kernel_gateway", f"kg-kernel:{kid}", "kg-user:alice"}
        assert app["queue"].endswith("default") and app["allocatedMB"] == 512, app
        with KernelWS(gw, kid) as ws:
            out, _ = ws.run("import os; print(os.environ['CONTAINER_ID'], os.environ['KERNEL_USERNAME'])")
            container, user = out.split()
            assert container.startswith("container_" + app["id"][len("application_"):]) and user == "Alice"
            ports = eval(ws.run(LISTENING_PORTS)[0])
            assert len(ports) >= 6 and all(LOW <= p <= HIGH for p in ports), ports
            out, _ = ws.run("import os; print(os.path.exists(os.environ['HADOOP_TOKEN_FILE_LOCATION']))")
            assert out.strip() == "False", "the container_tokens file (launch token, AMRM token) should be gone"
            interrupt_busy_loop(gw, ws, kid)
            status, body, _ = call(gw, "POST", f"/api/kernels/{kid}/restart", timeout=120)
            assert status == 200 and body["id"] == kid, body
            assert final_state(yarn, app["id"])["state"] in ("KILLED", "FINISHED")
            assert ws.run("print('after restart')")[0].strip() == "after restart"
        restarted = yarn.kernel_app(instance, kid)
        assert restarted and restarted["id"] != app["id"], "restart should run a new application"
        assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
        ended = yarn.app(restarted["id"])  # the DELETE returns once the application is final
        assert ended["state"] in ("FINISHED", "KILLED"), ended
        assert not yarn.apps(instance)
    finally:
        gw.stop()


HOSTILE = "a\"b'c$(touch {m}/dollar)`touch {m}/tick`;touch {m}/semi|touch {m}/pipe&&{{HOME}}<LOG_DIR>$HOME\\"


def test_hostile_kernel_values_reach_the_kernel_verbatim(tmp_path, yarn, proxy, instance):
    markers = tmp_path / "markers"
    markers.mkdir()
    hostile = HOSTILE.format(m=markers)
    env = {"KERNEL_USERNAME": "x'\"$(id)`id`;,", "KERNEL_HOSTILE": hostile, "KERNEL_OTHER": "$(touch " + str(markers) + "/o)"}
    gw = yarn_gateway(tmp_path, yarn, proxy, instance)
    try:
        kid = start_kernel(gw, "yarn", env=env)
        with KernelWS(gw, kid) as ws:
            out, _ = ws.run("import os, json; print(json.dumps({k: os.environ[k] for k in "
                            "('KERNEL_USERNAME', 'KERNEL_HOSTILE', 'KERNEL_OTHER')}))")
        assert json.loads(out) == env
        app = yarn.kernel_app(instance, kid)
        [user_tag] = [t for t in app["applicationTags"].split(",") if t.startswith("kg-user:")]
        assert user_tag == "kg-user:x____id__id___", user_tag  # unsafe characters replaced, no comma
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "yarn", "env": {"KERNEL_X": "a\ntouch x"}})
        assert status == 400, body  # newlines never get as far as YARN
        assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
        assert list(markers.iterdir()) == [], "a KERNEL_* value was executed"
    finally:
        gw.stop()


def test_failing_am_command_reports_yarn_diagnostics(tmp_path, yarn, proxy, instance):
    gw = yarn_gateway(tmp_path, yarn, proxy, instance)
    try:
        started = time.monotonic()
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "broken"}, timeout=150)
        assert status == 502, body
        message = body["message"]
        assert "FAILED" in message and "exitCode" in message and "/nonexistent/java-am" in message, message
        assert time.monotonic() - started < 60, "the failure should be noticed, not timed out"
        # the registering AM ran, the launcher failed: the AM's final status and the container's stderr tail
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "exits"}, timeout=150)
        assert status == 502, body
        assert "FINISHED/FAILED" in body["message"] and "launcher-boom" in body["message"], body
        assert not yarn.apps(instance)
    finally:
        gw.stop()


@pytest.mark.parametrize("env, words", [
    ({"KERNEL_QUEUE": "other"}, "KERNEL_QUEUE 'other' is not allowed"),
    ({"KERNEL_MEMORY": "64g"}, "KERNEL_MEMORY=64g is above the limit of 4g"),
    ({"KERNEL_MEMORY": "lots"}, "not a memory size"),
    ({"KERNEL_CPUS": "3"}, "KERNEL_CPUS=3 must be between 1 and 1"),
    ({"KERNEL_PRIORITY": "high"}, "KERNEL_PRIORITY must be a whole number"),
])
def test_requests_beyond_the_limits_start_nothing(tmp_path, yarn, proxy, instance, env, words):
    gw = yarn_gateway(tmp_path, yarn, proxy, instance)
    try:
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "yarn", "env": env})
        assert status == 400 and words in body["message"], body
        assert not proxy.count()["POST /ws/v1/cluster/apps"], "no application should have been submitted"
    finally:
        gw.stop()


def test_unknown_queue_is_refused_by_yarn(tmp_path, yarn, proxy, instance):
    gw = yarn_gateway(tmp_path, yarn, proxy, instance)
    try:
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "yarn", "env": {"KERNEL_QUEUE": "nosuchqueue"}})
        assert status in (400, 502) and "nosuchqueue" in body["message"], body
        assert not yarn.apps(instance)
    finally:
        gw.stop()


def test_full_queue_is_refused_with_yarns_numbers(tmp_path, yarn, proxy, instance):
    am_limit, largest = yarn.queue_limits()
    gw = yarn_gateway(tmp_path, yarn, proxy, instance, queue_wait=0.5, max_memory=f"{largest}m")
    try:
        kids = [start_kernel(gw, "yarn")]
        used = wait_until(lambda: yarn.kernel_app(instance, kids[0])["allocatedMB"], 30, what="allocation")
        while used + largest <= am_limit:  # fill the queue's AM share (whole nodes), then ask for one node more
            kids.append(start_kernel(gw, "yarn", env={"KERNEL_MEMORY": f"{largest}m"}))
            used += largest
        started = time.monotonic()
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "yarn", "env": {
            "KERNEL_MEMORY": f"{largest}m", "KERNEL_LAUNCH_TIMEOUT": "20"}}, timeout=120)
        elapsed = time.monotonic() - started
        assert status == 503, body
        assert "AM resource limit exceeded" in body["message"] and f"memory:{am_limit}" in body["message"], body
        assert 9 <= elapsed < 30, elapsed  # half of the 20 s launch timeout, then a poll interval and the kill
        print(f"\nfull queue: {status} after {elapsed:.1f}s: {body['message']}")
        apps = yarn.apps(instance, states="NEW,NEW_SAVING,SUBMITTED,ACCEPTED,RUNNING,KILLED")
        assert sorted(a["state"] for a in apps) == ["KILLED"] + ["RUNNING"] * len(kids), apps
    finally:
        for kid in kids:
            call(gw, "DELETE", f"/api/kernels/{kid}", timeout=120)
        gw.stop()
    assert not yarn.apps(instance)


def test_kernels_on_both_node_managers(tmp_path, yarn, proxy, instance, yarn_cluster):
    _, largest = yarn.queue_limits()
    gw = yarn_gateway(tmp_path, yarn, proxy, instance, memory=f"{largest}m")  # a whole node each
    try:
        kids = [start_kernel(gw, "yarn") for _ in yarn_cluster.nodes]
        hosts = {}
        for kid in kids:
            with KernelWS(gw, kid) as ws:
                out, _ = ws.run("import os; print(os.environ['NM_HOST'], os.environ['CONTAINER_ID'])")
                hosts[kid] = out.split()[0]
            assert yarn.kernel_app(instance, kid)["masterNodeId"].startswith(hosts[kid] + ":")
        assert len(set(hosts.values())) == len(yarn_cluster.nodes), hosts
        for kid in kids:
            assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
    finally:
        gw.stop()


def test_ten_kernels_cost_one_query_per_interval_with_first_rm_down(tmp_path, yarn, proxy, instance):
    closed = f"http://127.0.0.1:{free_port()}"  # RM HA: the first endpoint is down, the provisioner follows the next
    gw = yarn_gateway(tmp_path, yarn, proxy, instance, rm_urls=[closed, proxy.url], poll_interval=1.0, memory="256m")
    try:
        with ThreadPoolExecutor(10) as pool:
            kids = list(pool.map(lambda _: start_kernel(gw, "yarn"), range(10)))
        assert len(yarn.apps(instance)) == 10
        window_start = time.monotonic()
        time.sleep(10)  # the measurement window itself, not a synchronisation
        seen = proxy.count(window_start)
        polls = seen["GET /ws/v1/cluster/apps"]
        assert 8 <= polls <= 12, seen  # one batched query per 1 s interval for ten kernels
        assert sum(seen.values()) == polls, f"only the batched query while kernels idle: {seen}"
        print(f"\nRM requests in 10 s with 10 kernels: {dict(seen)}")
        with ThreadPoolExecutor(10) as pool:
            assert set(pool.map(lambda k: call(gw, "DELETE", f"/api/kernels/{k}", timeout=120)[0], kids)) == {204}
        assert not yarn.apps(instance)
    finally:
        gw.stop()


def test_orphans_of_a_killed_gateway_are_reaped_by_the_next(tmp_path, yarn, proxy, instance):
    first = yarn_gateway(tmp_path / "a", yarn, proxy, instance)
    kids = [start_kernel(first, "yarn") for _ in range(2)]
    first.stop(signal.SIGKILL)
    orphans = [yarn.kernel_app(instance, k) for k in kids]
    assert all(a and a["state"] == "RUNNING" for a in orphans), orphans
    second = yarn_gateway(tmp_path / "b", yarn, proxy, instance)
    try:
        kid = start_kernel(second, "yarn")
        for orphan in orphans:
            assert final_state(yarn, orphan["id"])["state"] == "KILLED"
        assert [a["name"] for a in yarn.apps(instance)] == [kid]
        assert "left by an earlier run" in second.log()
        assert call(second, "DELETE", f"/api/kernels/{kid}")[0] == 204
    finally:
        second.stop()
        for orphan in orphans:  # never leave an application behind, even if the reaping failed
            if yarn.app(orphan["id"])["state"] not in FINAL:
                yarn.rest("PUT", f"/apps/{orphan['id']}/state", {"state": "KILLED"})


def test_specs_install_yarn_writes_a_working_spec(tmp_path, yarn, proxy):
    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "kernel_gateway", "specs", "install", "yarn", "--name", "yarn-cli",
                    "--prefix", str(prefix), "--python", sys.executable, "--rm-urls", proxy.url,
                    "--am-command", yarn.am_command, "--memory", "300m", "--port-range", PORTS],
                   check=True, capture_output=True, timeout=60)
    spec = json.loads((prefix / "share/jupyter/kernels/yarn-cli/kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "yarn-provisioner"
    gw = start_gateway(tmp_path=tmp_path, env={"JUPYTER_PATH": str(prefix / "share/jupyter"),
                                               "GATEWAY_RESPONSE_HOST": yarn.gateway_address}, timeout=60)
    try:
        kid = start_kernel(gw, "yarn-cli")
        # the spec declares CurveZMQ, so 'auto' encrypts the kernel's channels (issue 12)
        assert spec["metadata"]["supported_encryption"] == ["curve"]
        assert "curve_publickey" in json.loads((tmp_path / "runtime" / f"kernel-{kid}.json").read_text())
        with KernelWS(gw, kid) as ws:
            assert ws.run("import os; print(os.environ['CONTAINER_ID'][:10])")[0].strip() == "container_"
        assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
    finally:
        gw.stop()


async def reattach_and_run(yarn, first, code: str, timeout: float = 60) -> None:
    """A later manager (a restarted gateway) that knows only ``first``'s stored connection and provisioner info
    re-attaches to its kernel, runs ``code`` there and shuts it down through the RM; the app is killed in any case."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.provisioning import KernelProvisionerFactory

    info = await first.provisioner.get_provisioner_info()
    try:
        app = yarn.app(info["app_id"])
        assert app["name"] == first.kernel_id and app["state"] == "RUNNING" and info["am_host"], (info, app)
        later = AsyncKernelManager(kernel_name=first.kernel_name, kernel_id=first.kernel_id)
        later.load_connection_info(first.get_connection_info())
        later.provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
            first.kernel_id, later.kernel_spec, parent=later)
        await later.provisioner.load_provisioner_info(dict(info))
        assert later.has_kernel and await later.is_alive()
        client = later.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=60)
            reply = await client.execute_interactive(code, timeout=timeout)
            assert reply["content"]["status"] == "ok", reply["content"]
        finally:
            client.stop_channels()
        await later.shutdown_kernel(now=True)
        assert yarn.app(info["app_id"])["state"] in FINAL
    finally:
        if yarn.app(info["app_id"])["state"] not in FINAL:
            yarn.rest("PUT", f"/apps/{info['app_id']}/state", {"state": "KILLED"})
        await first.cleanup_resources()  # its control socket, else the interpreter's exit waits on its context


# one loop for every in-process YARN test: the provisioners' response listener and RM watcher are per process
@pytest.mark.asyncio(loop_scope="session")
async def test_a_later_manager_reattaches_from_provisioner_info(tmp_path, yarn, proxy, instance, monkeypatch):
    from jupyter_client.manager import AsyncKernelManager

    write_spec(tmp_path / "data", "yarn", {"rm_urls": [proxy.url], "am_command": yarn.am_command, "memory": "300m",
                                           "port_range": PORTS, "instance_name": instance, "poll_interval": 0.5,
                                           "response_host": yarn.gateway_address})
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "data"))
    first = AsyncKernelManager(kernel_name="yarn")
    await first.start_kernel()
    info = await first.provisioner.get_provisioner_info()
    assert LOW <= info["control_port"] <= HIGH, info
    await reattach_and_run(yarn, first, "import os; print(os.environ['CONTAINER_ID'])")


def test_am_command_reaches_bash_verbatim(tmp_path):
    """The NodeManager's own wrapping, for real: ``exec /bin/bash -c "<command>"`` with <LOG_DIR> expanded."""
    from provisioners.errors import LaunchRequestError
    from provisioners.yarn import YarnProvisioner

    echo_argv = f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
    provisioner = YarnProvisioner(rm_urls=["http://127.0.0.1:1"], am_command=echo_argv, bootstrap_python="py3")
    argv = ["/usr/bin/python3", "a\"b'c", "$(touch x)`touch y`$HOME\\", "line1\nline2; touch z", "*", "--k={kernel}"]
    command = provisioner.am_command_line(argv).replace("<LOG_DIR>", str(tmp_path))
    (tmp_path / "launch_container.sh").write_text(f'#!/bin/bash\nexec /bin/bash -c "{command}"\n')
    subprocess.run(["bash", str(tmp_path / "launch_container.sh")], cwd=tmp_path, check=True, timeout=30)
    seen = json.loads((tmp_path / "stdout").read_text())
    assert seen[:2] == ["py3", "-c"] and seen[3:] == argv, seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["launch_container.sh", "stderr", "stdout"]
    for marker in ("{{HOME}}", "<LOG_DIR>", "<CPS>"):
        with pytest.raises(LaunchRequestError, match="expansion marker"):
            provisioner.am_command_line(["python3", f"x{marker}"])


def test_impersonation_submits_as_the_kernel_user(tmp_path, yarn, proxy, instance):
    gw = yarn_gateway(tmp_path, yarn, proxy, instance, impersonate=True)
    try:
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "yarn", "env": {"KERNEL_USERNAME": "bob;id"}})
        assert status == 400 and "not a valid user name" in body["message"], body
        kid = start_kernel(gw, "yarn", env={"KERNEL_USERNAME": "bob"})
        assert yarn.kernel_app(instance, kid)["user"] == "bob"
        assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
    finally:
        gw.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kernel_that_will_not_exit_is_killed_through_the_rm(tmp_path, yarn, proxy, instance):
    gw = yarn_gateway(tmp_path, yarn, proxy, instance)
    try:
        kid = start_kernel(gw, "yarn")
        app = yarn.kernel_app(instance, kid)
        with KernelWS(gw, kid) as ws:  # an exit that hangs and a deaf ear to SIGTERM: only a kill ends it
            out, _ = ws.run("import atexit, os, signal, time; atexit.register(time.sleep, 600); "
                            "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(os.getpid())")
        pid = int(out)
        assert call(gw, "DELETE", f"/api/kernels/{kid}", timeout=120)[0] == 204
        assert yarn.app(app["id"])["state"] == "KILLED"
        assert "PUT /ws/v1/cluster/apps/{id}/state" in {f"{m} {p.split('application_')[0]}{{id}}/state"
                                                        for _, m, p in proxy.seen if p.endswith("/state")}
        wait_until(lambda: not _alive(pid), 30, what="the kernel process ended by YARN")
    finally:
        gw.stop()


def test_gateway_shutdown_leaves_no_application(tmp_path, yarn, proxy, instance):
    gw = yarn_gateway(tmp_path, yarn, proxy, instance)
    kids = [start_kernel(gw, "yarn") for _ in range(2)]
    apps = [yarn.kernel_app(instance, k)["id"] for k in kids]
    assert gw.stop() == 0
    assert not yarn.apps(instance), [a["id"] for a in yarn.apps(instance)]
    assert all(yarn.app(a)["state"] in FINAL for a in apps)
