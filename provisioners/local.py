"""Local kernels (child processes of the host) whose ports all lie inside a configured range."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import logging
import os
import subprocess
from typing import Any

import zmq
from jupyter_client.launcher import launch_kernel
from jupyter_client.provisioning import LocalProvisioner
from zmq.utils import z85

from launchers import PYTHON_LAUNCHER, WARM_LOCAL_READY

from ._blocking import run_blocking
from .adopted_process import AdoptedProcess, process_identity
from .encryption import TransportEncryption
from .errors import LaunchError
from .ports import KERNEL_PORT_COUNT, PortAllocator, PortRangeOption, default_port_range, parse_port_range
from .warm import WarmStartable

__all__ = ["PortRangeLocalProvisioner"]

_PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
#: Besides its five channels, ipykernel binds one more port for itself (the iopub pipe).
_SPARE_PORTS = 1


def curve_pair(session_key: bytes) -> tuple[bytes, bytes]:
    """A local kernel's CurveZMQ key pair (public, secret; Z85), derived from its HMAC session key.

    The session key is the kernel's other secret, kept with it wherever its record goes (sealed); the pair adds
    no secret of its own to store, and whoever restarts the kernel makes the same one.
    """
    secret = z85.encode(hmac.new(session_key, b"kernel-gateway curve secret key v1", hashlib.sha256).digest())
    return zmq.curve_public(secret), secret


class PortRangeLocalProvisioner(LocalProvisioner, WarmStartable, TransportEncryption):  # type: ignore[misc]
    """jupyter_client's local provisioner, with every kernel port drawn from ``port_range``.

    Ports are reserved in the process-wide :class:`PortAllocator` from ``pre_launch`` until the
    kernel is cleaned up for good; a restart keeps them, so clients reconnect to the same ports.
    An ipykernel spec is run through our launcher, which keeps the ports ipykernel picks for
    itself inside the range too. The kernel's output is logged line by line with its id.

    Warm (pools): the launcher runs with ``--warm-local``, ipykernel imported and nothing bound, its stdin a pipe
    only this gateway holds; ``launch_kernel`` writes it the kernel's argv, environment and working directory.

    Transport encryption (``transport_encryption``) is jupyter_client's own: the kernel's CurveZMQ key pair
    goes into the connection file, which the kernel reads. The pair is derived from the kernel's session key
    (:func:`curve_pair`), so every restart, by whichever gateway, keeps it.
    """

    port_range = PortRangeOption(
        "",
        config=True,
        help="Ports the kernel may listen on, 'low..high' inclusive; empty draws them from the 10,000 ports "
        "below the OS's ephemeral range.",
    ).tag(env="GATEWAY_PORT_RANGE")

    _held_ports: tuple[int, ...] = ()
    _output_task: asyncio.Task | None = None
    _warm_process: subprocess.Popen | None = None
    _warm_ready: asyncio.Event | None = None  # set when the warm process says it imported the kernel's modules

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._last_output: collections.deque[str] = collections.deque(maxlen=15)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Reserve ports in the range, then let the local provisioner write the connection file.

        Called by ``KernelManager.pre_start_kernel`` before every (re)start; calls ``super()`` last.
        """
        encrypt = self.encrypts()  # first: may refuse the request before anything is reserved
        # always our allocator: ports picked independently by concurrent starts (and by ipykernel for
        # its own pipe) collide under load, and a kernel that loses a port dies at start-up
        port_range = parse_port_range(self.port_range) or default_port_range()
        km = self.parent
        if km is not None and km.transport == "tcp":
            if not self._held_ports:
                count = KERNEL_PORT_COUNT + _SPARE_PORTS
                self._held_ports = tuple(PortAllocator.instance().allocate(count, port_range, km.ip))
            km.cache_ports = False
            for name, port in zip(_PORT_NAMES, self._held_ports):
                setattr(km, name, port)
            self._run_through_launcher(str(port_range), self._held_ports[KERNEL_PORT_COUNT:])
        if km is not None:
            # jupyter_client provisions (and on restarts reuses) the pair the manager holds; ours derives it from
            # the session key, so a gateway that took the kernel over from its record (which has no secret key)
            # restarts it with the same pair, and every replica's sockets stay valid
            km.curve_publickey, km.curve_secretkey = curve_pair(km.session.key) if encrypt else (None, None)
        # the spec's support is checked above: jupyter_client's 'required' just provisions the keys
        kwargs["transport_encryption"] = "required" if encrypt else "disabled"
        return await super().pre_launch(**kwargs)

    @property
    def supports_warm(self) -> bool:  # type: ignore[override]
        """Only ipykernel specs start warm: our launcher runs them."""
        return self.kernel_spec.argv[1:3] in (["-m", "ipykernel_launcher"], ["-m", "ipykernel"])

    def _run_through_launcher(self, port_range: str, spare: tuple[int, ...]) -> None:
        """Rewrite the standard ipykernel argv to start the kernel through our launcher's local mode."""
        argv = list(self.kernel_spec.argv)
        if not self.supports_warm:
            return  # another kernel: its five connection ports are in range; what else it binds is its own
        rest = [arg for arg in argv[3:] if arg not in ("-f", "{connection_file}")]
        self.kernel_spec.argv = [argv[0], str(PYTHON_LAUNCHER), "--connection-file", "{connection_file}",
                                 "--port-range", port_range, "--spare-ports", ",".join(map(str, spare)), *rest]

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> dict[str, Any]:
        """Start the process (fork and exec off the event loop) with its output piped to our log.

        Called by ``KernelManager``; does what ``LocalProvisioner.launch_kernel`` does, in the thread pool.
        """
        warm, self._warm_process = self._warm_process, None
        if warm is not None and warm.poll() is None and cmd[1:2] == [str(PYTHON_LAUNCHER)]:
            start = {"argv": cmd[2:], "env": kwargs.get("env") or {}, "cwd": kwargs.get("cwd")}
            await run_blocking(_send_start, warm, json.dumps(start).encode() + b"\n")
            self.process = warm
        else:
            if warm is not None:
                await self._end(warm)
            kwargs.setdefault("stdout", subprocess.PIPE)
            kwargs.setdefault("stderr", subprocess.STDOUT)
            self.process = await run_blocking(launch_kernel, cmd, **self._scrub_kwargs(kwargs))
            self._follow_output()
        self.pid = self.process.pid
        try:
            self.pgid = os.getpgid(self.pid)
        except OSError:
            self.pgid = None
        self.cwd = kwargs.get("cwd") or os.getcwd()
        return self.connection_info

    async def warm_up(self, **kwargs: Any) -> None:
        """Start the launcher with ``--warm-local``; ``launch_kernel`` hands it the kernel. ``kwargs``: ``independent``."""
        # the interpreter a cold start runs (jupyter_client puts its own in place of a plain "python")
        python = self.parent.format_kernel_cmd()[0] if self.parent is not None else self.kernel_spec.argv[0]
        cmd = [python, str(PYTHON_LAUNCHER), "--warm-local"]
        self.process = await run_blocking(launch_kernel, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, env=os.environ.copy(),
                                          independent=bool(kwargs.get("independent")))
        self._warm_process, self.process = self.process, None
        self._warm_ready = asyncio.Event()
        self._follow_output(self._warm_process)
        ready = asyncio.ensure_future(self._warm_ready.wait())
        try:  # ready, or ended (its output closed): the pool's timeout bounds the wait
            await asyncio.wait({ready, self._output_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self._warm_ready.is_set():
            status = self._warm_process.poll()
            await self.discard_warm()
            raise LaunchError(f"the warm kernel process ended (status {status}) before it was ready; "
                              + await self.launch_diagnostics())

    def warm_ended(self) -> bool:
        return self._warm_process is None or self._warm_process.poll() is not None

    async def discard_warm(self) -> None:
        warm, self._warm_process = self._warm_process, None
        if warm is not None:
            await self._end(warm)
        if self._output_task is not None:
            self._output_task.cancel()
            self._output_task = None

    @staticmethod
    async def _end(process: subprocess.Popen) -> None:
        """Kill a warm process that is not handed out, and reap it."""
        if process.poll() is None:
            process.kill()
        await run_blocking(process.wait)

    def _follow_output(self, process: subprocess.Popen | None = None) -> None:
        process = process or self.process
        if process is not None and process.stdout is not None:
            self._output_task = asyncio.ensure_future(self._log_output(process.stdout))

    async def _log_output(self, pipe: Any) -> None:
        log = logging.LoggerAdapter(logging.getLogger("kernel_gateway.kernel_output"), {"kernel_id": self.kernel_id})
        reader = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        while line := await reader.readline():
            text = line.decode(errors="replace").rstrip()
            if self._warm_ready is not None and text.endswith(WARM_LOCAL_READY):
                self._warm_ready.set()
                continue
            self._last_output.append(text)
            log.info("%s", text)

    async def launch_diagnostics(self) -> str:
        """The kernel's last lines of output, for a failed start's message."""
        return "last lines of the kernel's output:\n" + "\n".join(self._last_output) if self._last_output else ""

    async def cleanup(self, restart: bool = False) -> None:
        """Release the ports unless the kernel is restarting. Called from ``KernelManager.cleanup_resources``."""
        await super().cleanup(restart=restart)
        if self._warm_process is not None:  # a warm start that failed before its hand-out
            await self.discard_warm()
        if self._output_task is not None:
            self._output_task.cancel()
            self._output_task = None
        if not restart and self._held_ports:
            PortAllocator.instance().release(self._held_ports)
            self._held_ports = ()

    async def send_signal(self, signum: int) -> None:
        if isinstance(self.process, AdoptedProcess) and self.process.poll() is not None:
            return  # gone: its pid and process group may be someone else's by now
        await super().send_signal(signum)

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info["held_ports"] = list(self._held_ports)
        if self.pid:
            info["process"] = process_identity(self.pid)
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        """Adopt the kernel process an earlier gateway started (see :mod:`.adopted_process`) and hold its ports."""
        await super().load_provisioner_info(provisioner_info)
        self._held_ports = tuple(provisioner_info.get("held_ports", ()))
        for port in self._held_ports:
            PortAllocator.instance().reserve(port)
        self.ip = provisioner_info.get("ip")
        if self.pid:
            self.process = AdoptedProcess(self.pid, provisioner_info.get("process") or {})


def _send_start(process: subprocess.Popen, line: bytes) -> None:
    """Write a warm process its start line and close the pipe (blocking: the environment may exceed a pipe buffer)."""
    assert process.stdin is not None
    with process.stdin:
        process.stdin.write(line)
