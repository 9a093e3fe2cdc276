"""A local kernel process started by an earlier gateway, handled as jupyter_client handles its own children.

A gateway that keeps its kernels when it stops (``KernelRegistry.on_stop = keep``) starts local kernels in
their own session without the parent-death watch, so they outlive it. The next gateway is not their parent:
it cannot ``waitpid`` them, so liveness comes from ``/proc``, and the process's start time (with the boot id)
guards against a recycled pid being taken for the kernel.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

__all__ = ["AdoptedProcess", "process_identity"]

#: the exit status reported for an adopted process once it is gone (its real status went to its new parent)
GONE = -1


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when there is no such live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    if fields[0] in ("Z", "X"):  # exited, not yet reaped by its new parent
        return None
    return int(fields[19])


def process_identity(pid: int) -> dict[str, object]:
    """What tells process ``pid`` apart from a later one that reuses its number (kept in provisioner info)."""
    return {"start_ticks": _start_ticks(pid), "boot_id": _boot_id()}


class AdoptedProcess:
    """The ``subprocess.Popen`` subset jupyter_client's local provisioner uses, for a process we did not start."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int, identity: dict[str, object]) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._identity = identity
        if not identity.get("start_ticks") or identity.get("boot_id") != _boot_id():
            self.returncode = GONE  # recorded before a reboot, or never known: not ours to signal

    def poll(self) -> int | None:
        if self.returncode is None and _start_ticks(self.pid) != self._identity["start_ticks"]:
            self.returncode = GONE
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        # callers (LocalProvisioner.wait) call this only once poll() has reported the end
        status = self.poll()
        if status is None:
            raise RuntimeError(f"adopted process {self.pid} is still running")
        return status

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

