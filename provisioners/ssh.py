"""SSH-distributed kernels: launchers started on a list of hosts over paramiko.

One SSH connection per host is shared by every kernel there; each kernel's launcher runs in the
foreground of its own channel, so the channel's exit status *is* the liveness watch (no polling
over SSH). The launch token travels on the channel's stdin, never on a command line; every value
placed on the remote command line is quoted.
"""

from __future__ import annotations

import asyncio
import getpass
import re
import shlex
import socket
from typing import Any

import paramiko
from traitlets import Bool, CaselessStrEnum, Float, Integer, List, TraitError, Unicode, validate

from ._blocking import run_blocking
from .errors import LaunchError, LaunchRequestError
from .remote import RemoteProvisioner, impersonated_user

__all__ = ["SSHProvisioner"]


class _Hosts:
    """Connections and kernel counts per host, shared by all SSH kernels of the process."""

    def __init__(self) -> None:
        self.clients: dict[tuple[str, int, str], paramiko.SSHClient] = {}
        self.locks: dict[tuple[str, int, str], asyncio.Lock] = {}
        self.counts: dict[str, int] = {}
        self.next_index = 0

    def pick(self, hosts: list[str], policy: str) -> str:
        """Choose a host and count the kernel on it at once, so concurrent starts see each other."""
        if policy == "least-connection":
            host = min(hosts, key=lambda h: (self.counts.get(h, 0), hosts.index(h)))
        else:
            host = hosts[self.next_index % len(hosts)]
            self.next_index += 1
        return self.take(host)

    def take(self, host: str) -> str:
        """Count one more kernel on ``host``."""
        self.counts[host] = self.counts.get(host, 0) + 1
        return host

    def release(self, host: str) -> None:
        if self.counts.get(host, 0) > 0:
            self.counts[host] -= 1


HOSTS = _Hosts()


class SSHProvisioner(RemoteProvisioner):
    """Starts each kernel's launcher on one of ``remote_hosts`` over SSH."""

    remote_hosts = List(
        Unicode(),
        config=True,
        help="Hosts kernels may run on; a client may pick one with KERNEL_REMOTE_HOST only from this list.",
    ).tag(env="GATEWAY_SSH_HOSTS")
    load_balancing = CaselessStrEnum(
        ["round-robin", "least-connection"],
        "round-robin",
        config=True,
        help="How a host is chosen: 'round-robin' cycles through the list; 'least-connection' takes the host "
        "running the fewest kernels, counting starts in flight.",
    ).tag(env="GATEWAY_SSH_LOAD_BALANCING")
    remote_user = Unicode(
        "",
        config=True,
        help="User to log in as; empty means the gateway's own user.",
    ).tag(env="GATEWAY_SSH_USER")
    ssh_port = Integer(22, config=True, help="SSH port of every host.").tag(env="GATEWAY_SSH_PORT")
    key_filename = Unicode(
        "",
        config=True,
        help="Private key file for SSH; empty uses the SSH agent and ~/.ssh keys.",
    ).tag(env="GATEWAY_SSH_KEY_FILE")
    known_hosts_file = Unicode(
        "",
        config=True,
        help="known_hosts file with the hosts' keys, read besides ~/.ssh/known_hosts.",
    ).tag(env="GATEWAY_SSH_KNOWN_HOSTS")
    accept_unknown_hosts = Bool(
        False,
        config=True,
        help="Connect to hosts whose key is not in known_hosts (trust on first use). Off: unknown hosts are "
        "refused.",
    ).tag(env="GATEWAY_SSH_ACCEPT_UNKNOWN_HOSTS")
    impersonate = Bool(
        False,
        config=True,
        help="Run each kernel as its KERNEL_USERNAME with 'sudo -n -u' on the host.",
    ).tag(env="GATEWAY_SSH_IMPERSONATE")
    remote_log_dir = Unicode(
        "/tmp",
        config=True,
        help="Directory on each host for kernel-<id>.log, kept for diagnosis.",
    ).tag(env="GATEWAY_SSH_LOG_DIR")
    connect_timeout = Float(15.0, config=True, help="Seconds to establish an SSH connection.").tag(env="GATEWAY_SSH_CONNECT_TIMEOUT")

    host: str | None = None
    _channel: paramiko.Channel | None = None
    _pid: int | None = None
    _user: str = ""

    @validate("remote_hosts")
    def _hosts_given(self, proposal: dict[str, Any]) -> list[str]:
        hosts = [h.strip() for h in proposal["value"] if h.strip()]
        if not hosts:
            raise TraitError("remote_hosts is empty: name at least one host (GATEWAY_SSH_HOSTS)")
        return hosts

    @property
    def _login(self) -> str:
        return self.remote_user or getpass.getuser()

    # -- connections ------------------------------------------------------------------------------
    async def _client(self, host: str) -> paramiko.SSHClient:
        key = (host, self.ssh_port, self._login)
        lock = HOSTS.locks.setdefault(key, asyncio.Lock())
        async with lock:
            client = HOSTS.clients.get(key)
            transport = client.get_transport() if client else None
            if client is None or transport is None or not transport.is_active():
                client = await run_blocking(self._connect, host)
                HOSTS.clients[key] = client
            return client

    def _connect(self, host: str) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        if self.known_hosts_file:
            client.load_host_keys(self.known_hosts_file)
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy() if self.accept_unknown_hosts else paramiko.RejectPolicy())
        target = f"{self._login}@{host}:{self.ssh_port}"
        try:
            client.connect(host, port=self.ssh_port, username=self._login, key_filename=self.key_filename or None,
                           timeout=self.connect_timeout, banner_timeout=self.connect_timeout,
                           auth_timeout=self.connect_timeout)
        except paramiko.BadHostKeyException as exc:
            raise LaunchError(f"ssh {target}: the host key does not match known_hosts ({exc})") from exc
        except paramiko.AuthenticationException as exc:
            raise LaunchError(f"ssh {target}: authentication failed ({exc})") from exc
        except paramiko.SSHException as exc:
            raise LaunchError(f"ssh {target}: {exc}") from exc
        except OSError as exc:
            raise LaunchError(f"ssh {target}: cannot connect ({exc.strerror or exc})") from exc
        client.get_transport().set_keepalive(30)
        return client

    async def _run(self, host: str, command: str, timeout: float = 20.0) -> tuple[int, str]:
        """Run a short command on ``host``; return its exit status and output."""
        client = await self._client(host)

        def run() -> tuple[int, str]:
            _, stdout, _ = client.exec_command(command, timeout=timeout)
            out = stdout.read().decode(errors="replace")
            return stdout.channel.recv_exit_status(), out

        try:
            return await run_blocking(run)
        except (paramiko.SSHException, OSError, socket.timeout) as exc:
            raise LaunchError(f"ssh {host}: {command.split()[0]} failed ({_describe(exc)})") from exc

    # -- RemoteProvisioner hooks --------------------------------------------------------------------
    async def advertised_host(self) -> str:
        """Pick the kernel's host (KERNEL_REMOTE_HOST or the balancing policy), connect, and return our address as seen from it."""
        if not self.host:  # a restart stays on the kernel's host
            self.host = self._choose_host()
        try:
            client = await self._client(self.host)
        except BaseException:
            self._release_host()
            raise
        if self.response_host:
            return self.response_host
        return client.get_transport().sock.getsockname()[0]

    _requested_host: str = ""

    def _choose_host(self) -> str:
        requested = self._requested_host
        if not requested:
            return HOSTS.pick(self.remote_hosts, self.load_balancing)
        if requested not in self.remote_hosts:
            raise LaunchRequestError(f"KERNEL_REMOTE_HOST {requested!r} is not one of the allowed hosts: "
                                     f"{', '.join(self.remote_hosts)}")
        return HOSTS.take(requested)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        env = kwargs.get("env") or {}
        self._requested_host = env.get("KERNEL_REMOTE_HOST", "")
        self._user = impersonated_user(env) if self.impersonate else env.get("KERNEL_USERNAME", "")
        return await super().pre_launch(**kwargs)

    @property
    def _sudo(self) -> str:
        """The command prefix that runs as the kernel's user when impersonating, else ''."""
        return f"sudo -n -u {shlex.quote(self._user)} " if self.impersonate else ""

    @property
    def _log_path(self) -> str:
        return f"{self.remote_log_dir.rstrip('/')}/kernel-{self.kernel_id}.log"

    def remote_command(self, cmd: list[str], env: dict[str, str]) -> str:
        """The shell command run on the host: prints its pid, then execs the launcher with output to the log."""
        assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()) if _env_name(k))
        launcher = " ".join(shlex.quote(part) for part in cmd)
        log = shlex.quote(self._log_path)
        return f"echo $$; exec {self._sudo}env {assignments} {launcher} > {log} 2>&1"

    async def start_launcher(self, cmd: list[str], env: dict[str, str], token: str) -> None:
        assert self.host is not None
        client = await self._client(self.host)
        command = self.remote_command(cmd, env)

        def start() -> tuple[paramiko.Channel, int]:
            channel = client.get_transport().open_session(timeout=self.connect_timeout)
            channel.exec_command(command)
            channel.sendall((token + "\n").encode())
            channel.shutdown_write()
            channel.settimeout(self.launch_timeout)  # a busy host may take a while to fork the shell
            first = b""
            while not first.endswith(b"\n"):
                chunk = channel.recv(64)
                if not chunk:
                    break
                first += chunk
            return channel, int(first.strip() or 0)

        try:
            self._channel, self._pid = await run_blocking(start)
        except (paramiko.SSHException, OSError, socket.timeout, ValueError) as exc:
            raise LaunchError(f"ssh {self.host}: could not start the launcher ({_describe(exc)})") from exc
        self.log.info("kernel %s: launcher started on %s (pid %s)", self.kernel_id, self.host, self._pid)

    def launcher_exit_status(self) -> int | None:
        channel = self._channel
        if channel is None:
            return None if self.host else 0
        if channel.exit_status_ready():
            return channel.recv_exit_status()
        if channel.closed:
            return -1  # the SSH connection is gone; the kernel cannot be reached
        return None

    async def kill_launcher(self) -> None:
        if self.host and self._pid:
            sudo = self._sudo
            try:
                await self._run(self.host, f"{sudo}kill -9 -- -{self._pid} 2>/dev/null || {sudo}kill -9 {self._pid} 2>/dev/null; true")
            except LaunchError as exc:
                self.log.warning("kernel %s: could not kill the launcher on %s: %s", self.kernel_id, self.host, exc)
        if self._channel is not None:
            self._channel.close()

    async def launch_diagnostics(self) -> str:
        if not self.host:
            return ""
        try:
            _, tail = await self._run(self.host, f"tail -n 15 {shlex.quote(self._log_path)} 2>&1")
        except LaunchError:
            return ""
        return f"last lines of {self.host}:{self._log_path}:\n{tail.strip()}" if tail.strip() else ""

    def _release_host(self) -> None:
        if self.host:
            HOSTS.release(self.host)
            self.host = None

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart)
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._pid = None
        if not restart:
            self._release_host()

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update(host=self.host, remote_pid=self._pid)
        return info


def _describe(exc: BaseException) -> str:
    """An exception as text, even when it carries no message (socket timeouts)."""
    return str(exc) or type(exc).__name__


def _env_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name))
