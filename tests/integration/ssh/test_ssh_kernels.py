"""Kernels on real SSH hosts (network namespaces running sshd), through the gateway."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from tests.services.client import KernelWS, call, start_kernel
from tests.services.gateway import wait_until

from .conftest import PORT_RANGE

pytestmark = pytest.mark.cluster

LOW, HIGH = (int(p) for p in PORT_RANGE.split(".."))


def kernel_host(gw, kernel_id):
    with KernelWS(gw, kernel_id) as ws:
        out, _ = ws.run("import socket, os; print(socket.gethostname(), os.environ.get('KERNEL_ID'))")
    return out.split()


def test_execute_on_remote_hosts_round_robin(ssh_gateway, ssh_cluster):
    ids = [start_kernel(ssh_gateway, "ssh") for _ in range(2)]
    try:
        addresses = set()
        for kid in ids:
            with KernelWS(ssh_gateway, kid) as ws:
                out, _ = ws.run("import os; print(os.environ['KERNEL_ID'])")
                assert out.strip() == kid
            addresses.add(ssh_cluster_address_of(ssh_cluster, kid))
        assert addresses == {h.address for h in ssh_cluster.hosts}, "round-robin put both kernels on one host"
    finally:
        for kid in ids:
            call(ssh_gateway, "DELETE", f"/api/kernels/{kid}")
    for host in ssh_cluster.hosts:
        wait_until(lambda h=host: not ssh_cluster.launcher_pids(h), 20, what=f"launchers gone on {host.name}")


def ssh_cluster_address_of(cluster, kernel_id):
    for host in cluster.hosts:
        for pid in cluster.launcher_pids(host):
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if kernel_id.encode() in handle.read():
                    return host.address
    raise AssertionError(f"kernel {kernel_id} runs on no host")


def test_ports_inside_range_on_every_host(ssh_gateway, ssh_cluster):
    ids = [start_kernel(ssh_gateway, "ssh") for _ in range(4)]
    try:
        for host in ssh_cluster.hosts:
            launchers = {str(pid) for pid in ssh_cluster.launcher_pids(host)}
            assert launchers, f"no kernel on {host.name}"
            ports = [port for port, owner in host.listening_ports().items() if any(f"pid={p}," in owner for p in launchers)]
            # at least five kernel ports and one control port per kernel, and every one in the range
            assert len(ports) >= 6 * len(launchers), ports
            assert all(LOW <= port <= HIGH for port in ports), ports
    finally:
        for kid in ids:
            call(ssh_gateway, "DELETE", f"/api/kernels/{kid}")


def test_least_connection_balances_concurrent_starts(ssh_gateway, ssh_cluster):
    results = []
    threads = [threading.Thread(target=lambda: results.append(call(ssh_gateway, "POST", "/api/kernels", {"name": "ssh-lc"})))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    ids = [body["id"] for status, body, _ in results if status == 201]
    try:
        assert len(ids) == 4, results
        per_host = [len(ssh_cluster.launcher_pids(h)) for h in ssh_cluster.hosts]
        assert per_host == [2, 2], per_host
    finally:
        for kid in ids:
            call(ssh_gateway, "DELETE", f"/api/kernels/{kid}")


@pytest.mark.parametrize("spec", ["ssh", "ssh-signal"])
def test_interrupt_restart_shutdown(ssh_gateway, ssh_cluster, spec):
    kid = start_kernel(ssh_gateway, spec)
    with KernelWS(ssh_gateway, kid) as ws:
        msg_id = ws.execute("while True:\n    pass")
        wait_until(lambda: call(ssh_gateway, "GET", f"/api/kernels/{kid}")[1]["execution_state"] == "busy", 60,
                   what="kernel busy")
        assert call(ssh_gateway, "POST", f"/api/kernels/{kid}/interrupt")[0] == 204
        msgs = ws.collect(msg_id, timeout=20)
        assert any(m["msg_type"] == "error" and m["content"]["ename"] == "KeyboardInterrupt" for m in msgs)
        status, body, _ = call(ssh_gateway, "POST", f"/api/kernels/{kid}/restart")
        assert status == 200 and body["id"] == kid
        out, _ = ws.run("print(40 + 2)")
        assert out.strip() == "42"
    assert call(ssh_gateway, "DELETE", f"/api/kernels/{kid}")[0] == 204
    for host in ssh_cluster.hosts:
        wait_until(lambda h=host: not any(kid.encode() in open(f"/proc/{p}/cmdline", "rb").read()
                                          for p in ssh_cluster.launcher_pids(h)), 20, what="kernel process gone")


def test_kill_9_is_noticed_and_kernel_restarts(ssh_gateway, ssh_cluster):
    kid = start_kernel(ssh_gateway, "ssh")
    try:
        with KernelWS(ssh_gateway, kid, session_id="watcher") as ws:
            address = ssh_cluster_address_of(ssh_cluster, kid)
            host = next(h for h in ssh_cluster.hosts if h.address == address)
            pid = next(p for p in ssh_cluster.launcher_pids(host) if kid.encode() in open(f"/proc/{p}/cmdline", "rb").read())
            os.kill(pid, signal.SIGKILL)
            deadline_msgs = []

            def restarting():
                msg = ws.recv(15)
                deadline_msgs.append(msg)
                return msg["msg_type"] == "status" and msg["content"]["execution_state"] == "restarting"

            wait_until(restarting, 15, what="status restarting after kill -9")
            wait_until(lambda: call(ssh_gateway, "GET", f"/api/kernels/{kid}")[1]["execution_state"] == "idle", 60,
                       what="kernel back after auto-restart")
            out, _ = ws.run("print('alive again')", timeout=60)
            assert out.strip() == "alive again"
    finally:
        call(ssh_gateway, "DELETE", f"/api/kernels/{kid}")


def test_remote_host_choice_is_limited_to_the_list(ssh_gateway, ssh_cluster):
    second = ssh_cluster.hosts[1].address
    status, body, _ = call(ssh_gateway, "POST", "/api/kernels", {"name": "ssh", "env": {"KERNEL_REMOTE_HOST": second}})
    assert status == 201, body
    try:
        assert ssh_cluster_address_of(ssh_cluster, body["id"]) == second
    finally:
        call(ssh_gateway, "DELETE", f"/api/kernels/{body['id']}")
    status, body, _ = call(ssh_gateway, "POST", "/api/kernels", {"name": "ssh", "env": {"KERNEL_REMOTE_HOST": "10.9.9.9"}})
    assert status == 400 and "not one of the allowed hosts" in body["message"]
