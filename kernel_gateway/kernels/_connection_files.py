"""Connection-file ledger: which ``kernel-<id>.json`` files in the runtime dir are this gateway's,
and the start-up sweep that removes those a killed gateway left behind.

The runtime dir (``jupyter_runtime_dir()``) may be shared with jupyter_server and other gateways, which
name their files the same way. So each gateway process lists the connection files it makes in a ledger,
``gateway-<pid>-<random>.kernels``, which it holds locked (``flock``) while it lives. The kernel drops
the lock with the process, even on SIGKILL: a ledger that can be locked belongs to a dead gateway.
At start-up its files whose kernel no longer listens are removed; files of kernels that outlived their
gateway are kept and passed into the new ledger, to be checked again at the next start.
"""

from __future__ import annotations

import asyncio
import fcntl
import glob
import json
import logging
import os
import re
import secrets

__all__ = ["ConnectionFiles"]

log = logging.getLogger("kernel_gateway.kernels")

LEDGER_PATTERN = "gateway-*.kernels"
_CONNECTION_FILE = re.compile(r"kernel-[\w-]+\.json")


class ConnectionFiles:
    """This gateway's ledger of the connection files it creates in ``runtime_dir``."""

    def __init__(self, runtime_dir: str) -> None:
        self.runtime_dir = runtime_dir
        self.ledger = ""
        self._fd: int | None = None

    def open(self) -> None:
        """Create and lock this process's ledger. Called once, by ``KernelRegistry.start``."""
        self.runtime_dir = os.path.realpath(self.runtime_dir)
        self.ledger = os.path.join(self.runtime_dir, f"gateway-{os.getpid()}-{secrets.token_hex(4)}.kernels")
        fd = os.open(self.ledger, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
        self._fd = fd

    def path_for(self, kernel_id: str) -> str:
        """The connection file for a new kernel, recorded in the ledger before the file exists."""
        path = os.path.join(self.runtime_dir, f"kernel-{kernel_id}.json")
        self._record(path)
        return path

    def close(self) -> None:
        """Release the ledger; remove it unless a file it lists is still there. Called by ``KernelRegistry.stop``."""
        if self._fd is None:
            return
        with open(self.ledger) as handle:
            if not any(os.path.exists(path) for path in handle.read().splitlines()):
                _remove(self.ledger)
        os.close(self._fd)
        self._fd = None

    def _record(self, path: str) -> None:
        if self._fd is not None:
            os.write(self._fd, (path + "\n").encode())

    async def sweep(self, probe_timeout: float = 1.0) -> int:
        """Remove the connection files of dead gateways whose kernels are gone; return how many.

        Called by ``KernelRegistry.start`` after :meth:`open`. Ledgers of live gateways are left alone.
        """
        removed = 0
        for ledger in glob.glob(os.path.join(self.runtime_dir, LEDGER_PATTERN)):
            if ledger == self.ledger:
                continue
            try:
                fd = os.open(ledger, os.O_RDONLY)
            except OSError:  # its gateway removed it meanwhile
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its gateway is running (or another one is sweeping it)
                with os.fdopen(os.dup(fd)) as handle:
                    paths = [p for p in handle.read().splitlines() if self._is_connection_file(p)]
                in_use = await asyncio.gather(*(_in_use(path, probe_timeout) for path in paths))
                for path, used in zip(paths, in_use):
                    if used:
                        self._record(path)
                    elif _remove(path):
                        removed += 1
                _remove(ledger)
            finally:
                os.close(fd)
        if removed:
            log.info("removed %d connection files left by a gateway that did not stop cleanly", removed)
        return removed

    def _is_connection_file(self, path: str) -> bool:
        """Only ``kernel-*.json`` directly in our runtime dir, whatever a ledger says."""
        return os.path.dirname(path) == self.runtime_dir and bool(_CONNECTION_FILE.fullmatch(os.path.basename(path)))


def _remove(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


async def _in_use(path: str, timeout: float) -> bool:
    """Whether a kernel may still use this connection file: its heartbeat port accepts connections."""
    try:
        with open(path) as handle:
            info = json.load(handle)
        ip, port, transport = info.get("ip") or "127.0.0.1", int(info["hb_port"]), info.get("transport", "tcp")
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # unreadable: no client can use it either
        return False
    if transport != "tcp":
        return os.path.exists(f"{ip}-{port}")  # ipc: the heartbeat socket file
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except ConnectionRefusedError:
        return False
    except (OSError, asyncio.TimeoutError):  # cannot tell: keep the file
        return True
    writer.close()
    return True
