"""Warm pools of SSH kernels: launchers wait warm on the hosts and a request gets one, bound late to its environment
through the launcher's control port; a request that names a host starts cold; the pool drains when the gateway stops.
Real gateway, real sshd hosts, real launchers and ipykernel."""

from __future__ import annotations

import os
import signal

import pytest

from tests.services.capture import assert_remote_kernel_encrypted
from tests.services.client import call, start_kernel
from tests.services.gateway import wait_until
from tests.services.kernel_store import run
from tests.services.scrape import metric

from .conftest import PORT_RANGE, write_ssh_spec
from .test_ssh_reattach import kernel_processes, launcher_alive

pytestmark = pytest.mark.cluster


def test_ssh_pool_hands_out_warm_launchers_late_bound(start_gw, ssh_cluster, tmp_path):
    write_ssh_spec(tmp_path / "data", "ssh", ssh_cluster, pool_size=2)
    gw = start_gw(f"--ResponseListener.response_port_range={PORT_RANGE}", "--GatewayPolicy.max_kernels_per_user=10",
                  env={"JUPYTER_PATH": str(tmp_path / "data"), "GATEWAY_POOL_CHECK_INTERVAL": "0.5"}, timeout=60)
    ready = lambda: metric(gw, "kernel_gateway_pool_kernels", kernelspec="ssh", state="ready")  # noqa: E731
    started: list[str] = []
    warm: list[int] = []
    try:
        wait_until(lambda: ready() == 2, 120, 0.2, what="two warm SSH launchers")
        kid = start_kernel(gw, "ssh", env={"KERNEL_USERNAME": "alice", "KERNEL_COLOR": "teal"}, timeout=90)
        started.append(kid)
        assert f"kernel={kid} started warm kernel ssh" in gw.log()
        [launcher] = kernel_processes(ssh_cluster, kid)
        out = run(gw, kid, "import os; print(os.environ['KERNEL_USERNAME'], os.environ['KERNEL_COLOR'], os.getpid())")
        assert out.split() == ["alice", "teal", str(launcher)], "the kernel runs in the warm launcher, with the request's env"
        # the client's variables travelled sealed: not on any command line, not in the launcher's initial environment
        assert b"teal" not in open(f"/proc/{launcher}/cmdline", "rb").read()
        assert b"KERNEL_COLOR" not in open(f"/proc/{launcher}/environ", "rb").read()
        assert metric(gw, "kernel_gateway_pool_hits_total", kernelspec="ssh") == 1

        # a request that names a host cannot be served by a launcher already running somewhere: cold
        host = ssh_cluster.hosts[-1].address
        cold = start_kernel(gw, "ssh", env={"KERNEL_REMOTE_HOST": host}, timeout=90)
        started.append(cold)
        assert f"kernel={cold} started kernel ssh" in gw.log()
        assert "starting cold: the request sets KERNEL_REMOTE_HOST" in gw.log()
        assert metric(gw, "kernel_gateway_pool_misses_total", kernelspec="ssh", reason="request") == 1

        # interrupt, restart and shutdown work on the handed-out kernel as on any other
        assert call(gw, "POST", f"/api/kernels/{kid}/interrupt")[0] == 204
        assert call(gw, "POST", f"/api/kernels/{kid}/restart", timeout=90)[0] == 200
        assert run(gw, kid, "import os; print(os.environ['KERNEL_COLOR'])").strip() == "teal"
        wait_until(lambda: ready() == 2, 120, 0.2, what="the pool refilled")
        warm = [pid for host in ssh_cluster.hosts for pid in ssh_cluster.launcher_pids(host)
                if not any(k.encode() in open(f"/proc/{pid}/cmdline", "rb").read() for k in started)]
        assert len(warm) >= 2
    finally:
        gw.stop()
    wait_until(lambda: not any(launcher_alive(pid) for pid in warm), 30, 0.2, what="warm launchers gone with the gateway")
    assert "Traceback" not in gw.log()
    for kid in started:
        for pid in kernel_processes(ssh_cluster, kid):  # a failed test leaves no launcher behind
            os.kill(pid, signal.SIGKILL)


def test_a_warm_launcher_hands_out_an_encrypted_kernel(start_gw, ssh_cluster, tmp_path):
    """Encryption is decided when the launcher starts warm (by the kernelspec), and the kernel it starts at hand-out
    is as encrypted as a cold one: nothing readable on the wire, no answer without the server key."""
    write_ssh_spec(tmp_path / "data", "ssh", ssh_cluster, metadata={"supported_encryption": ["curve"]}, pool_size=1)
    gw = start_gw(f"--ResponseListener.response_port_range={PORT_RANGE}",
                  env={"JUPYTER_PATH": str(tmp_path / "data"), "GATEWAY_POOL_CHECK_INTERVAL": "0.5"}, timeout=60)
    kid = None
    try:
        wait_until(lambda: metric(gw, "kernel_gateway_pool_kernels", kernelspec="ssh", state="ready") == 1, 120, 0.2,
                   what="a warm SSH launcher")
        kid = start_kernel(gw, "ssh", timeout=90)
        assert f"kernel={kid} started warm kernel ssh" in gw.log()
        assert_remote_kernel_encrypted(gw, tmp_path / "runtime", kid, tmp_path / "warm.pcap",
                                       lambda k: next(iter(kernel_processes(ssh_cluster, k)), None))
    finally:
        gw.stop()
        for pid in kernel_processes(ssh_cluster, kid) if kid else ():
            os.kill(pid, signal.SIGKILL)
