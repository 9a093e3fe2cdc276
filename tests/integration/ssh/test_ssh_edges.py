"""SSH kernels at the edges: injection attempts, an unreachable gateway, EG kernelspecs, a plain jupyter server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.services.client import KernelWS, call, start_kernel
from tests.services.gateway import free_port, start_gateway, wait_until

from .conftest import PORT_RANGE, write_ssh_spec

pytestmark = pytest.mark.cluster
EG_LAUNCHER = Path(__file__).resolve().parents[2] / "services" / "eg_style_launcher.py"


def kernel_runs_on(cluster, kernel_id) -> bool:
    for host in cluster.hosts:
        for pid in cluster.launcher_pids(host):
            try:
                if kernel_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


def test_client_values_never_execute_on_the_host(ssh_gateway, ssh_cluster, tmp_path):
    marker = f"/tmp/kgw-injected-{uuid.uuid4().hex}"
    hostile = {
        "KERNEL_USERNAME": f"alice; touch {marker}-1",
        "KERNEL_EXTRA": f"$(touch {marker}-2)",
        "KERNEL_QUOTES": f"'\"; touch {marker}-3; echo \"'",
        "KERNEL_TICKS": f"`touch {marker}-4`",
    }
    kid = start_kernel(ssh_gateway, "ssh", env=hostile)
    try:
        with KernelWS(ssh_gateway, kid) as ws:
            out, _ = ws.run("import os, json; print(json.dumps({k: os.environ[k] for k in %r}))" % sorted(hostile))
        assert json.loads(out) == hostile, "values must arrive verbatim"
        assert not list(Path("/tmp").glob(Path(marker).name + "*")), "a client value was executed"
    finally:
        call(ssh_gateway, "DELETE", f"/api/kernels/{kid}")
    status, body, _ = call(ssh_gateway, "POST", "/api/kernels", {"name": "ssh", "env": {"KERNEL_X": "a\ntouch x"}})
    assert status == 400 and "KERNEL_X" in body["message"]


def test_impersonation_refuses_bad_user_names(ssh_cluster, tmp_path):
    data = tmp_path / "data"
    write_ssh_spec(data, "ssh-sudo", ssh_cluster, impersonate=True)
    gw = start_gateway(tmp_path=tmp_path, env={"JUPYTER_PATH": str(data)})
    try:
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "ssh-sudo", "env": {"KERNEL_USERNAME": "bob;id"}})
        assert status == 400 and "not a valid user name" in body["message"]
    finally:
        gw.stop()


def test_unreachable_response_address_fails_cleanly(ssh_cluster, tmp_path):
    data = tmp_path / "data"
    # an address on the hosts' subnet that nobody answers for
    write_ssh_spec(data, "ssh-lost", ssh_cluster, response_host="10.231.1.99")
    gw = start_gateway(tmp_path=tmp_path, env={"JUPYTER_PATH": str(data)})
    try:
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "ssh-lost", "env": {"KERNEL_LAUNCH_TIMEOUT": "6"}})
        assert status in (502, 504), body
        assert "launcher" in body["message"] and ("6s" in body["message"] or "exited" in body["message"]), body
        assert "Traceback" not in json.dumps(body)
        for host in ssh_cluster.hosts:
            wait_until(lambda h=host: not ssh_cluster.launcher_pids(h), 15, what=f"no launcher left on {host.name}")
        assert call(gw, "GET", "/api/kernels")[1] == []
    finally:
        gw.stop()


def test_launcher_exit_is_explained_in_the_error_and_the_gateway_log(ssh_cluster, tmp_path):
    """The launcher's own message (said after ipykernel took over its stderr) reaches the client and our log."""
    data = tmp_path / "data"
    # 127.0.0.1 on the host: nothing listens there, so every report is refused and the launcher gives up
    write_ssh_spec(data, "ssh-refused", ssh_cluster, response_host="127.0.0.1")
    spec_file = data / "kernels" / "ssh-refused" / "kernel.json"
    spec = json.loads(spec_file.read_text())
    spec["argv"] += ["--connect-timeout", "3"]
    spec_file.write_text(json.dumps(spec))
    gw = start_gateway(tmp_path=tmp_path, env={"JUPYTER_PATH": str(data)})
    try:
        status, body, _ = call(gw, "POST", "/api/kernels",
                               {"name": "ssh-refused", "env": {"KERNEL_LAUNCH_TIMEOUT": "60"}})
        assert status == 502, body
        message = body["message"]
        assert "the launcher exited with status 3" in message, message
        assert "cannot report to the gateway at 127.0.0.1:" in message, message
        kid = message.split("kernel ", 1)[1].split(":", 1)[0]
        wait_until(lambda: f"kernel={kid}" in gw.log() and "cannot report to the gateway at 127.0.0.1:" in gw.log(),
                   15, what="the launcher's message in the gateway log")
    finally:
        gw.stop()


def test_a_kernel_that_dies_leaves_its_launchers_last_words_in_the_gateway_log(ssh_gateway, ssh_cluster):
    kid = start_kernel(ssh_gateway, "ssh")
    try:
        with KernelWS(ssh_gateway, kid) as ws:  # open until the end: closing it could drop the request
            ws.execute("import os; os._exit(7)")
            wait_until(lambda: f"kernel {kid}: the launcher exited with status 7" in ssh_gateway.log(), 60,
                       what="the launcher's exit in the gateway log")
        logged = ssh_gateway.log().split(f"kernel {kid}: the launcher exited with status 7", 1)[1]
        assert f"kernel-{kid}.log" in logged and "[launcher" in logged and "ready: ports" in logged, logged[:3000]
    finally:
        call(ssh_gateway, "DELETE", f"/api/kernels/{kid}")


def test_enterprise_gateway_kernelspec_runs_unchanged(ssh_cluster, tmp_path):
    spec_dir = tmp_path / "data" / "kernels" / "eg_python_distributed"
    spec_dir.mkdir(parents=True)
    spec = {
        "display_name": "EG Python distributed",
        "language": "python",
        "metadata": {"process_proxy": {
            "class_name": "enterprise_gateway.services.processproxies.distributed.DistributedProcessProxy",
            "config": {"remote_hosts": ",".join(h.address for h in ssh_cluster.hosts),
                       "key_filename": str(ssh_cluster.key_file), "known_hosts_file": str(ssh_cluster.known_hosts),
                       "remote_user": "root", "authorized_users": "alice,bob"}}},
        "argv": [sys.executable, str(EG_LAUNCHER),
                 "--RemoteProcessProxy.kernel-id", "{kernel_id}",
                 "--RemoteProcessProxy.response-address", "{response_address}",
                 "--RemoteProcessProxy.public-key", "{public_key}",
                 "--RemoteProcessProxy.port-range", "{port_range}"],
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    env = {"JUPYTER_PATH": str(tmp_path / "data")}
    refused = subprocess.run([sys.executable, "-m", "kernel_gateway", f"--port={free_port()}", "--no-auth"],
                             env=dict(os.environ, **env), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert refused.returncode != 0 and "accept_enterprise_gateway" in refused.stderr
    gw = start_gateway(tmp_path=tmp_path, env=dict(env, GATEWAY_ACCEPT_ENTERPRISE_GATEWAY="true"))
    try:
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "eg_python_distributed",
                                                             "env": {"KERNEL_USERNAME": "mallory"}})
        assert status == 403, body
        kid = start_kernel(gw, "eg_python_distributed", env={"KERNEL_USERNAME": "alice"})
        assert kernel_runs_on_eg(ssh_cluster, kid)
        with KernelWS(gw, kid) as ws:
            assert ws.run("print(6 * 7)")[0].strip() == "42"
            msg_id = ws.execute("while True:\n    pass")
            wait_until(lambda: call(gw, "GET", f"/api/kernels/{kid}")[1]["execution_state"] == "busy", 20, what="busy")
            assert call(gw, "POST", f"/api/kernels/{kid}/interrupt")[0] == 204  # EG's plain comm port
            msgs = ws.collect(msg_id, timeout=20)
            assert any(m["msg_type"] == "error" and m["content"]["ename"] == "KeyboardInterrupt" for m in msgs)
        assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
        wait_until(lambda: not kernel_runs_on_eg(ssh_cluster, kid), 20, what="EG-style kernel gone")
    finally:
        gw.stop()


def kernel_runs_on_eg(cluster, kernel_id) -> bool:
    for host in cluster.hosts:
        for pid in host.pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"eg_style_launcher.py" in cmdline and kernel_id.encode() in cmdline:
                return True
    return False


def test_plain_jupyter_server_runs_ssh_kernels(ssh_cluster, tmp_path):
    """Our provisioners as a library: a jupyter server without our gateway starts an SSH kernel."""
    data = tmp_path / "data"
    write_ssh_spec(data, "ssh", ssh_cluster)
    port = free_port()
    env = dict(os.environ, JUPYTER_PATH=str(data), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), JUPYTER_DATA_DIR=str(tmp_path / "jd"))
    log = open(tmp_path / "jupyter.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
         "--no-browser", "--allow-root", "--IdentityProvider.token=srv", f"--ServerApp.root_dir={tmp_path}",
         f"--ResponseListener.response_port_range={PORT_RANGE}"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    server = SimpleNamespace(url=f"http://127.0.0.1:{port}", ws_url=f"ws://127.0.0.1:{port}",
                             headers={"Authorization": "token srv"})
    try:
        wait_until(lambda: _up(server), 60, what="jupyter server up")
        status, body, _ = call(server, "POST", "/api/kernels", {"name": "ssh"})
        assert status == 201, (body, (tmp_path / "jupyter.log").read_text()[-3000:])
        kid = body["id"]
        assert kernel_runs_on(ssh_cluster, kid)
        with KernelWS(server, kid, session_id=uuid.uuid4().hex) as ws:
            out, _ = ws.run("import os; print(os.environ.get('KERNEL_ID'))")
        assert out.strip() == kid
        assert call(server, "DELETE", f"/api/kernels/{kid}")[0] == 204
        wait_until(lambda: not kernel_runs_on(ssh_cluster, kid), 20, what="kernel gone")
    finally:
        proc.terminate()
        proc.wait(30)


def _up(server) -> bool:
    try:
        return call(server, "GET", "/api/kernelspecs", timeout=2)[0] == 200
    except OSError:
        return False
