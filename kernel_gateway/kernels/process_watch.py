"""A kernel restarter that wakes when a local kernel's process exits instead of polling it on a timer.

jupyter_client's ``AsyncIOLoopKernelRestarter`` gives every kernel its own ``PeriodicCallback`` that asks the
provisioner ``poll()`` every ``time_to_dead`` seconds (3): with 1,000 kernels that is 333 timers, tasks and
``waitpid`` calls a second, growing with the kernel count, while nothing happens. For a kernel that is a process
of this host, Linux tells us when it ends: a pidfd (``os.pidfd_open``, Linux 5.3) becomes readable, and the event
loop watches it with no timer and no system call until then. :class:`ProcessExitRestarter` does that and runs
jupyter_client's own ``poll()`` (restart, restart limit, 'dead' callbacks: unchanged) only when the process ended,
plus once ``stable_start_time`` after each start (jupyter_client's "alive long enough" check).

Kernels it cannot watch that way (remote provisioners, whose ``process`` is not a local process; a pid already
gone; no pidfd on this system) are polled exactly as before.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from jupyter_client.ioloop.restarter import AsyncIOLoopKernelRestarter
from jupyter_client.provisioning import LocalProvisioner

__all__ = ["ProcessExitRestarter"]


class ProcessExitRestarter(AsyncIOLoopKernelRestarter):
    """``AsyncIOLoopKernelRestarter`` driven by the local kernel process's exit (a pidfd) rather than a timer."""

    _pidfd: int | None = None
    _stable_check: asyncio.TimerHandle | None = None
    _polling = False  # fallback: the timer of the base class runs

    def _local_pid(self) -> int | None:
        provisioner = self.kernel_manager.provisioner
        if not isinstance(provisioner, LocalProvisioner):
            return None  # remote kernels: their 'process' is not one of this host's
        pid = getattr(getattr(provisioner, "process", None), "pid", None)
        return pid if isinstance(pid, int) and pid > 0 else None

    def start(self) -> None:
        """Watch the kernel process (called by the manager after every start); poll when it cannot be watched."""
        if self._pidfd is not None or self._polling:
            return
        pid = self._local_pid()
        if pid is None or not hasattr(os, "pidfd_open"):
            self._polling = True
            super().start()
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # already gone (ESRCH) or no pidfd support: the timer finds out as before
            self._polling = True
            super().start()
            return
        loop = asyncio.get_running_loop()
        self._pidfd = fd
        loop.add_reader(fd, self._exited)
        stable = self.stable_start_time
        if self.kernel_manager.provisioner is not None:
            stable = self.kernel_manager.provisioner.get_stable_start_time(recommended=stable)
        # jupyter_client clears _initial_startup/_restarting once a poll finds the kernel alive that long
        self._stable_check = loop.call_later(stable + 0.1, self._poll_soon)

    def stop(self) -> None:
        """Stop watching (called by the manager before a shutdown or restart)."""
        if self._pidfd is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._pidfd)
            except RuntimeError:  # no running loop (interpreter shutdown): the fd is closed below anyway
                pass
            os.close(self._pidfd)
            self._pidfd = None
        if self._stable_check is not None:
            self._stable_check.cancel()
            self._stable_check = None
        if self._polling:
            self._polling = False
            super().stop()

    def _exited(self) -> None:
        """The process ended: stop watching its pidfd and let jupyter_client's poll decide (restart or dead)."""
        self.stop()
        self._poll_soon()

    def _poll_soon(self) -> None:
        self._stable_check = None
        asyncio.ensure_future(self._poll_and_rewatch())

    async def _poll_and_rewatch(self) -> None:
        await self.poll()
        # poll() restarted the kernel (the manager called start() for the new process), gave up (stop()), or
        # found it alive; a process that died while a restart was already under way is caught here
        if self._pidfd is None and not self._polling and self._restarting and not self.kernel_manager.shutting_down:
            self.start()

    def __del__(self) -> None:  # a pidfd must not outlive the restarter
        fd: Any = self._pidfd
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
