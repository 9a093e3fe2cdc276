"""A later gateway re-attaches to SSH kernels from their stored provisioner info (issue 10).

Each test starts kernels with one ``AsyncKernelManager`` (the first gateway), then drops that gateway's SSH
connections as its death would, and builds a second manager the way a new gateway does from a kernel record:
a new provisioner from the same kernelspec, ``load_provisioner_info`` with what went through JSON, connection info
loaded. Through the second one the kernel must work as if it had been started there. The helpers here are the
re-attach steps the Docker tests use too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

from provisioners import ssh
from tests.services.gateway import wait_until

from .conftest import write_ssh_spec

pytestmark = pytest.mark.cluster


async def eventually(predicate, timeout: float, what: str) -> None:
    """Await ``predicate()`` (a coroutine function) until it is truthy; the loop keeps running meanwhile."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.2)


async def exited(km) -> bool:
    return await km.provisioner.poll() is not None


async def stored_record(km) -> tuple[dict, dict]:
    """The provisioner info and connection info a gateway stores for ``km``'s kernel, as JSON gives them back."""
    info = await km.provisioner.get_provisioner_info()
    connection = dict(info.pop("connection_info"))  # the store keeps it apart (its key is bytes here)
    connection["key"] = connection["key"].decode()
    return json.loads(json.dumps(info)), json.loads(json.dumps(connection))


async def reattach(kernel_name: str, kernel_id: str, info: dict, connection: dict, inline: bool = False):
    """A manager for a running kernel built from its record, as a new gateway does. ``inline``: the connection
    info (its key as text) rides in the provisioner info, else it is set on the provisioner beforehand."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.provisioning import KernelProvisionerFactory

    later = AsyncKernelManager(kernel_name=kernel_name, kernel_id=kernel_id)
    later.load_connection_info(connection)
    later.provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        kernel_id, later.kernel_spec, parent=later)
    if inline:
        info = {**info, "connection_info": connection}
    else:
        later.provisioner.connection_info = dict(connection)
    await later.provisioner.load_provisioner_info(info)
    return later


async def run_code(km, code: str, timeout: float = 60) -> str:
    """Run ``code`` in ``km``'s kernel; its stdout."""
    client = km.client()
    client.start_channels()
    out: list[str] = []
    try:
        await client.wait_for_ready(timeout=timeout)
        reply = await client.execute_interactive(code, timeout=timeout, output_hook=lambda m: out.append(
            m["content"].get("text", "") if m["msg_type"] == "stream" else ""))
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        client.stop_channels()
    return "".join(out)


async def interrupt_by_signal(km, timeout: float = 60) -> None:
    """Interrupt a busy cell through the launcher's control port (the provisioner's ``send_signal``)."""
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=timeout)
        msg_id = client.execute("import time\nwhile True:\n    time.sleep(0.01)")
        deadline = time.monotonic() + timeout
        while True:  # busy: the cell runs
            msg = await client.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.1))
            if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "busy"):
                break
        await km.provisioner.send_signal(signal.SIGINT)
        while True:
            reply = await client.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.1))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
    finally:
        client.stop_channels()


@pytest.fixture
def spec_path(tmp_path, ssh_cluster, monkeypatch) -> Path:
    write_ssh_spec(tmp_path / "data", "ssh", ssh_cluster, reattach_poll_interval=1.0)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "data"))
    return tmp_path / "data"


async def start_first(ssh_cluster, host_index: int = 0, count: int = 1):
    """Kernels started by the first gateway on one host."""
    from jupyter_client.manager import AsyncKernelManager

    kms = [AsyncKernelManager(kernel_name="ssh") for _ in range(count)]
    env = {**os.environ, "KERNEL_REMOTE_HOST": ssh_cluster.hosts[host_index].address}
    await asyncio.gather(*(km.start_kernel(env=env) for km in kms))
    return kms


def new_gateway(monkeypatch) -> None:
    """The first gateway's SSH connections end with it; the new one starts with no connection and no watch."""
    for client in ssh.HOSTS.clients.values():
        client.close()
    monkeypatch.setattr(ssh, "HOSTS", ssh._Hosts())


def kernel_processes(cluster, kernel_id: str) -> list[int]:
    """Pids on the cluster's hosts whose command line names ``kernel_id`` (the hosts share our pid namespace)."""
    found = []
    for host in cluster.hosts:
        for pid in cluster.launcher_pids(host):
            try:
                if kernel_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                continue
    return found


def launcher_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# one loop for every in-process remote-kernel test: the response listener is per process
@pytest.mark.asyncio(loop_scope="session")
async def test_reattached_kernel_runs_interrupts_and_shuts_down(spec_path, ssh_cluster, monkeypatch):
    records: list[tuple[dict, dict]] = []
    kms = await start_first(ssh_cluster, count=2)
    try:
        for km in kms:
            await run_code(km, "x = 41")
            records.append(await stored_record(km))
        info, _ = records[0]
        assert info["host"] == ssh_cluster.hosts[0].address and info["remote_started"], info
        assert info["control_key"] and info["control_port"] and info["legacy"] is False, info
        new_gateway(monkeypatch)
        assert all(launcher_alive(i["remote_pid"]) for i, _ in records), "the launchers outlive the gateway"

        laters = await asyncio.gather(*(reattach("ssh", km.kernel_id, i, c, inline=n == 1)
                                        for n, (km, (i, c)) in enumerate(zip(kms, records))))
        [watch] = ssh.HOSTS.watches.values()
        assert watch.checks == 1, "re-attaches made together share one check per host"
        for later in laters:
            assert later.has_kernel and await later.is_alive() and await later.provisioner.poll() is None
        checks, began = watch.checks, time.monotonic()
        await asyncio.sleep(4)  # not a wait for a condition: a span in which to count the 1 s checks
        made = watch.checks - checks
        assert 1 <= made <= (time.monotonic() - began) / 1.0 + 1, f"{made} checks: one per interval for both kernels"
        assert all([await later.is_alive() for later in laters])

        later, other = laters
        assert (await run_code(later, "x += 1; print(x)")).strip() == "42"
        await interrupt_by_signal(later)
        assert (await run_code(later, "print(x)")).strip() == "42"

        await later.shutdown_kernel()
        assert not later.has_kernel
        wait_until(lambda: not kernel_processes(ssh_cluster, later.kernel_id), 30,
                   what="no process of the re-attached kernel after shutdown")
        assert await other.is_alive(), "the other re-attached kernel is untouched"
        await other.provisioner.terminate()  # SIGTERM through the control port
        await eventually(lambda: exited(other), 30, "the terminated launcher's exit seen by the watch")
        await other.shutdown_kernel(now=True)
        wait_until(lambda: not kernel_processes(ssh_cluster, other.kernel_id), 30, what="the second kernel gone too")
        assert not watch.launchers
    finally:
        for km in kms:
            await km.cleanup_resources()
        for km in kms:
            for pid in kernel_processes(ssh_cluster, km.kernel_id):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_kernel_that_died_while_no_gateway_ran(spec_path, ssh_cluster, monkeypatch):
    [first] = await start_first(ssh_cluster, host_index=1)
    try:
        info, connection = await stored_record(first)
        new_gateway(monkeypatch)
        os.kill(info["remote_pid"], signal.SIGKILL)  # behind the gateway's back
        wait_until(lambda: not launcher_alive(info["remote_pid"]), 30, what="the launcher killed")
        later = await reattach("ssh", first.kernel_id, info, connection)
        assert await later.provisioner.poll() is not None, "a dead launcher is reported at once, not as running"
        assert not await later.is_alive()
        await later.shutdown_kernel(now=True)  # what a gateway does with a dead record: clean up, no error
        assert not later.has_kernel
    finally:
        await first.cleanup_resources()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_reused_pid_is_not_taken_for_the_launcher(spec_path, ssh_cluster, monkeypatch):
    """A record whose pid now belongs to another process (a different start time) is a dead kernel, and cleaning
    it up must not kill that process. Shown with the live launcher and a start time that is not its own."""
    [first] = await start_first(ssh_cluster)
    try:
        info, connection = await stored_record(first)
        later = await reattach("ssh", first.kernel_id, {**info, "remote_started": "1"}, connection)
        assert await later.provisioner.poll() is not None
        await later.shutdown_kernel(now=True)
        assert launcher_alive(info["remote_pid"]), "the process now holding the pid was not killed"
        assert await first.is_alive()
    finally:
        await first.shutdown_kernel(now=True)
        await first.cleanup_resources()
    wait_until(lambda: not launcher_alive(info["remote_pid"]), 30, what="the launcher gone")
