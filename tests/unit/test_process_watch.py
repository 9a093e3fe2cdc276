"""ProcessExitRestarter for real: jupyter_client kernel managers with the load-test kernel (a real process), killed
with SIGKILL; the restarter must notice through the process's pidfd, with no per-kernel timer."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.kernelspec import KernelSpecManager

from kernel_gateway.kernels.process_watch import ProcessExitRestarter

KERNEL_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "loadtest_kernel"
DEADLINE = 60.0  # generous: the machine is shared with other test runs

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs os.pidfd_open (Linux 5.3+)")


@pytest.fixture
def manager(tmp_path):
    """``manager(**traits)`` -> a started AsyncIOLoopKernelManager with ProcessExitRestarter; all shut down after."""
    spec_dir = tmp_path / "kernels" / "loadtest"
    shutil.copytree(KERNEL_DIR, spec_dir, ignore=shutil.ignore_patterns("__pycache__"))
    spec = json.loads((spec_dir / "kernel.json").read_text())
    spec.pop("metadata")  # jupyter_client's own local provisioner: this test needs no gateway
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    started: list[AsyncIOLoopKernelManager] = []

    async def start(**traits) -> AsyncIOLoopKernelManager:
        km = AsyncIOLoopKernelManager(kernel_name="loadtest", kernel_spec_manager=ksm, restarter_class=ProcessExitRestarter,
                                      connection_file=str(tmp_path / f"kernel-{len(started)}.json"), **traits)
        started.append(km)
        await km.start_kernel()
        return km

    yield start
    # the test's event loop is gone by now: whatever a test left running is killed by pid
    for km in started:
        pid = km.provisioner.pid if km.provisioner else None
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def wait_for(predicate, what: str):
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {DEADLINE}s waiting for {what}")
        await asyncio.sleep(0.05)


def fd_open(fd: int) -> bool:
    return os.path.exists(f"/proc/self/fd/{fd}")


async def test_watches_the_process_without_a_timer(manager):
    km = await manager()
    restarter = km._restarter
    assert isinstance(restarter, ProcessExitRestarter)
    assert restarter._pidfd is not None and fd_open(restarter._pidfd)
    assert restarter._pcallback is None  # no PeriodicCallback: nothing runs until the process ends
    await km.shutdown_kernel(now=True)


async def test_killed_kernel_is_restarted_and_watched_again(manager):
    km = await manager()
    events: list[str] = []
    km.add_restart_callback(lambda: events.append("restart"), "restart")
    old_pid = km.provisioner.pid
    os.kill(old_pid, signal.SIGKILL)
    await wait_for(lambda: km.provisioner.pid not in (None, old_pid) and km._restarter._pidfd is not None,
                   "the automatic restart")
    assert events == ["restart"]
    assert await km.is_alive()
    await km.shutdown_kernel(now=True)


async def test_restart_limit_reached_reports_dead_and_stops_watching(manager):
    km = await manager()
    km._restarter.restart_limit = 0
    events: list[str] = []
    km.add_restart_callback(lambda: events.append("dead"), "dead")
    os.kill(km.provisioner.pid, signal.SIGKILL)
    await wait_for(lambda: events, "the 'dead' callback")
    assert events == ["dead"]
    assert km._restarter._pidfd is None


async def test_shutdown_closes_the_pidfd(manager):
    km = await manager()
    fd = km._restarter._pidfd
    await km.shutdown_kernel(now=False)
    assert km._restarter._pidfd is None
    assert not fd_open(fd) or os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[pidfd]"
