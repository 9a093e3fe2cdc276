"""SSH kernels outlive a gateway with ``on_stop=keep`` (issue 10), end to end: real gateway processes, real sshd
hosts, a real SQLite kernel store. The next gateway at the same address serves the kernel under the same id with
its variables, interrupts, restarts and shuts it down; a launcher killed while no gateway ran is cleaned up.

The model is ``tests/api/test_reattach.py`` (local kernels); the store fixture and helpers are in tests/services/kernel_store.py.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.services.client import KernelWS, call, start_kernel
from tests.services import kernel_store
from tests.services.gateway import wait_until
from tests.services.kernel_store import (interrupt_and_restart, no_traceback, not_served, records,
                                         restarts_after_death, run, serve_again, served_after_restart, stop_keeping)

from .conftest import PORT_RANGE, write_ssh_spec
from .test_ssh_reattach import kernel_processes, launcher_alive

pytestmark = pytest.mark.cluster

keep = kernel_store.keep  # the same fixture: a store key and a SQLite store under tmp_path
interrupt_mode = kernel_store.interrupt_mode  # 'message' unless a test parametrizes 'signal'


@pytest.fixture
def start_keeping(start_gw, keep, ssh_cluster, tmp_path, interrupt_mode):
    """Start a gateway that keeps its kernels and has the spec 'ssh' (re-attached launchers checked every 1 s)."""
    write_ssh_spec(tmp_path / "data", "ssh", ssh_cluster, reattach_poll_interval=1.0, interrupt_mode=interrupt_mode)
    env = {**keep, "JUPYTER_PATH": str(tmp_path / "data")}

    def start(port: int | None = None):
        return start_gw(f"--ResponseListener.response_port_range={PORT_RANGE}", env=env, port=port, timeout=60)

    return start


@pytest.mark.parametrize("interrupt_mode", ["signal"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_ssh_kernel_outlives_the_gateway_and_is_served_again(start_keeping, keep, ssh_cluster, sig):
    first = start_keeping()
    kid = start_kernel(first, "ssh", env={"KERNEL_USERNAME": "alice"}, timeout=90)
    run(first, kid, "kept = 41 + 1")
    [launcher] = kernel_processes(ssh_cluster, kid)
    old_ws = KernelWS(first, kid)

    stop_seconds = stop_keeping(first, sig)
    assert launcher_alive(launcher), "the remote launcher ended with the gateway"

    second, ready_seconds, answer_seconds = serve_again(start_keeping, first, kid, old_ws)
    try:
        print(f"\nTIMING ssh {sig.name}: gateway stopped in {stop_seconds:.2f}s; the new one ready after "
              f"{ready_seconds:.2f}s, the kernel answered after {answer_seconds:.2f}s")
        assert kernel_processes(ssh_cluster, kid) == [launcher], "served by the same launcher, not a new one"
        interrupt_and_restart(second, kid, "alice")  # the signal goes through the launcher's control port
        [relaunched] = kernel_processes(ssh_cluster, kid)
        assert relaunched != launcher and not launcher_alive(launcher), "the restart replaced the launcher"

        assert call(second, "DELETE", f"/api/kernels/{kid}")[0] == 204
        wait_until(lambda: not kernel_processes(ssh_cluster, kid), 30, 0.2, what="the kernel's launcher gone")
    finally:
        second.stop()
        for pid in kernel_processes(ssh_cluster, kid):  # a failed test leaves no launcher behind
            os.kill(pid, signal.SIGKILL)
    assert records(keep) == []
    no_traceback(first, second)


@pytest.mark.parametrize("interrupt_mode", ["message", "signal"])
def test_a_launcher_killed_while_no_gateway_ran_is_cleaned(start_keeping, keep, ssh_cluster):
    first = start_keeping()
    dead, alive = (start_kernel(first, "ssh", timeout=90) for _ in range(2))
    first.stop()
    for pid in kernel_processes(ssh_cluster, dead):
        os.kill(pid, signal.SIGKILL)  # the hosts share our pid namespace
    wait_until(lambda: not kernel_processes(ssh_cluster, dead), 30, 0.1, what="the killed launcher gone")

    second = start_keeping(port=first.port)
    try:
        not_served(second, dead, alive)
        assert call(second, "DELETE", f"/api/kernels/{alive}")[0] == 204
        wait_until(lambda: not kernel_processes(ssh_cluster, alive), 30, 0.2, what="the live kernel's launcher gone")
    finally:
        second.stop()
        for kid in (dead, alive):
            for pid in kernel_processes(ssh_cluster, kid):
                os.kill(pid, signal.SIGKILL)
    assert records(keep) == []
    no_traceback(first, second)


def test_a_reattached_kernel_that_dies_is_restarted_and_kept_again(start_keeping, keep, ssh_cluster):
    """The new gateway watches the re-attached launcher by pid: its death is noticed and the kernel restarted, and
    the record then names the new launcher, so a third gateway re-attaches to that one."""
    first = start_keeping()
    kid = start_kernel(first, "ssh", env={"KERNEL_USERNAME": "alice"}, timeout=90)
    first.stop()
    second = start_keeping(port=first.port)
    third = None
    try:
        [launcher] = kernel_processes(ssh_cluster, kid)
        restarts_after_death(second, kid, lambda: os.kill(launcher, signal.SIGKILL))
        [relaunched] = kernel_processes(ssh_cluster, kid)
        assert relaunched != launcher
        second.stop()
        assert launcher_alive(relaunched)
        third = served_after_restart(start_keeping, first, kid, "alice")
        assert call(third, "DELETE", f"/api/kernels/{kid}")[0] == 204
        wait_until(lambda: not kernel_processes(ssh_cluster, kid), 30, 0.2, what="the kernel's launcher gone")
    finally:
        for gw in (second, third):
            if gw is not None:
                gw.stop()
        for pid in kernel_processes(ssh_cluster, kid):
            os.kill(pid, signal.SIGKILL)
    assert records(keep) == []
    no_traceback(first, second, third)
