"""SSH-distributed kernels: launchers started on a list of hosts over paramiko.

One SSH connection per host is shared by every kernel there; each kernel's launcher runs in the
foreground of its own channel, so the channel's exit status *is* the liveness watch (no polling
over SSH). A kernel re-attached by a later gateway has no channel: its launcher is watched by
pid, with ONE command per host and interval for all such kernels (:class:`_PidWatch`), and the
pid's start time recorded at launch tells a reused pid from the launcher. The launch token
travels on the channel's stdin, never on a command line; every value placed on the remote
command line is quoted.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import re
import shlex
import socket
from typing import Any, Awaitable, Callable

import paramiko
from traitlets import Bool, CaselessStrEnum, Float, Integer, List, TraitError, Unicode, validate

from ._blocking import run_blocking
from .errors import LaunchError, LaunchRequestError
from .remote import RemoteProvisioner, impersonated_user

__all__ = ["SSHProvisioner"]

log = logging.getLogger("provisioners.ssh")

#: exit status poll() gives for a re-attached launcher found gone (its real status went with its SSH channel)
GONE = -1


def _proc_fields(pid: str) -> str:
    """Shell text printing the state and start time (clock ticks since boot) of ``pid`` from /proc, or nothing.

    Fields after the ``)`` that ends the command name: 1 is the state, 20 the start time (stat's 3rd and 22nd)."""
    return f"sed 's/.*) //' /proc/{pid}/stat 2>/dev/null | cut -d' ' -f1,20"


class _PidWatch:
    """Liveness of the launchers re-attached on one host: every ``interval``, ONE command over the host's shared
    connection reports all their pids (the loop only awaits; the SSH work runs in the thread pool).

    A launcher counts as ended when its pid is gone, a zombie, or now has another start time than the one
    recorded at launch (the pid was reused)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.launchers: dict[str, tuple[int, str]] = {}  # kernel id -> (pid, start time; '' if unknown)
        self.status: dict[str, int] = {}  # kernel id -> exit status, once its launcher is found ended
        self.interval = 3.0
        self.checks = 0  # commands run so far (tests count them)
        self._run: Callable[[str, str], Awaitable[tuple[int, str]]] | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._waiters: list[asyncio.Future] = []
        self._failing = False

    def add(self, kernel_id: str, pid: int, started: str, run: Callable[[str, str], Awaitable[tuple[int, str]]],
            interval: float) -> asyncio.Future:
        """Watch ``pid`` for ``kernel_id``; the future is done after the first check that covered it.

        Re-attaches made together (a gateway starting up) share that check."""
        self.launchers[kernel_id] = (pid, started)
        self.status.pop(kernel_id, None)
        self._run, self.interval = run, interval
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()  # events and tasks belong to one loop
            self._waiters = []
            self._task = loop.create_task(self._watch())
        waiter = loop.create_future()
        self._waiters.append(waiter)
        self._wake.set()
        return waiter

    def remove(self, kernel_id: str) -> None:
        self.launchers.pop(kernel_id, None)
        self.status.pop(kernel_id, None)

    async def _watch(self) -> None:
        while self.launchers:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            waiters, self._waiters = self._waiters, []
            try:
                await self.check()
            except Exception:  # keep watching the other kernels; the next round tries again
                log.exception("checking re-attached kernels' launchers on %s failed", self.host)
            finally:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
        self._task = None

    async def check(self) -> None:
        """One command for every watched pid on the host; record the launchers that ended."""
        launchers = {k: v for k, v in self.launchers.items() if k not in self.status}
        if not launchers or self._run is None:
            return
        pids = " ".join(sorted({str(pid) for pid, _ in launchers.values()}))
        command = (f'for p in {pids}; do s=$({_proc_fields("$p")}); if [ -n "$s" ]; then echo "$p $s"; '
                   f'elif kill -0 $p 2>/dev/null; then echo "$p ?"; else echo "$p -"; fi; done')
        self.checks += 1
        try:
            _, out = await self._run(self.host, command)
        except LaunchError as exc:
            if not self._failing:  # once per outage: the kernels' state is unknown, not ended
                log.warning("cannot check re-attached kernels' launchers on %s: %s", self.host, exc)
            self._failing = True
            return
        self._failing = False
        seen = {fields[0]: fields[1:] for fields in (line.split() for line in out.splitlines()) if fields}
        for kernel_id, (pid, started) in launchers.items():
            fields = seen.get(str(pid), ["-"])
            gone = fields[0] in ("-", "Z") or bool(started and fields[-1] not in (started, "?"))
            if gone and self.launchers.get(kernel_id) == (pid, started):  # not removed or re-added meanwhile
                self.status[kernel_id] = GONE


class _Hosts:
    """Connections and kernel counts per host, shared by all SSH kernels of the process."""

    def __init__(self) -> None:
        self.clients: dict[tuple[str, int, str], paramiko.SSHClient] = {}
        self.locks: dict[tuple[str, int, str], asyncio.Lock] = {}
        self.counts: dict[str, int] = {}
        self.next_index = 0
        self.watches: dict[tuple[str, int, str], _PidWatch] = {}

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

    @property
    def cold_start_envs(self) -> tuple[str, ...]:  # type: ignore[override]
        """Request variables a warm launcher cannot honour: its host or queue is chosen, and it runs as the gateway's user."""
        return ("KERNEL_REMOTE_HOST",) + (("KERNEL_USERNAME",) if self.impersonate else ())

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
    reattach_poll_interval = Float(
        3.0,
        config=True,
        help="Seconds between liveness checks of kernels re-attached after a gateway restart (one SSH command per "
        "host for all of them; kernels this gateway started are watched through their SSH channel instead).",
    ).tag(env="GATEWAY_SSH_REATTACH_POLL_INTERVAL")

    host: str | None = None
    _channel: paramiko.Channel | None = None
    _pid: int | None = None
    _started: str = ""  # the launcher's start time on its host (/proc), telling it from a later process with its pid
    _reattached = False  # watched by pid (no channel): loaded from a previous gateway's provisioner info
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

    def _host_key(self, host: str) -> tuple[str, int, str]:
        return (host, self.ssh_port, self._login)

    # -- connections ------------------------------------------------------------------------------
    async def _client(self, host: str) -> paramiko.SSHClient:
        key = self._host_key(host)
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
        """The shell command run on the host: prints its pid, state and start time, then execs the launcher
        (same pid, same start time) with output to the log."""
        assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()) if _env_name(k))
        launcher = " ".join(shlex.quote(part) for part in cmd)
        log_file = shlex.quote(self._log_path)
        return f"echo $$ $({_proc_fields('$$')}); exec {self._sudo}env {assignments} {launcher} > {log_file} 2>&1"

    async def start_launcher(self, cmd: list[str], env: dict[str, str], token: str) -> None:
        assert self.host is not None
        client = await self._client(self.host)
        command = self.remote_command(cmd, env)

        def start() -> tuple[paramiko.Channel, int, str]:
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
            fields = first.decode(errors="replace").split()  # pid [state start-time]
            return channel, int(fields[0] if fields else 0), fields[2] if len(fields) > 2 else ""

        try:
            self._channel, self._pid, self._started = await run_blocking(start)
        except (paramiko.SSHException, OSError, socket.timeout, ValueError) as exc:
            raise LaunchError(f"ssh {self.host}: could not start the launcher ({_describe(exc)})") from exc
        self.log.info("kernel %s: launcher started on %s (pid %s)", self.kernel_id, self.host, self._pid)

    def launcher_exit_status(self) -> int | None:
        channel = self._channel
        if channel is None:
            if self._reattached and self.host:
                watch = HOSTS.watches.get(self._host_key(self.host))
                return watch.status.get(self.kernel_id) if watch else GONE
            return None if self.host else 0
        if channel.exit_status_ready():
            return channel.recv_exit_status()
        if channel.closed:
            return -1  # the SSH connection is gone; the kernel cannot be reached
        return None

    async def kill_launcher(self) -> None:
        """Kill the launcher's process group (and the launcher) by pid; not when the pid now belongs to another
        process (its start time differs from the launcher's)."""
        if self.host and self._pid:
            sudo, pid = self._sudo, int(self._pid)
            kill = f"{sudo}kill -9 -- -{pid} 2>/dev/null || {sudo}kill -9 {pid} 2>/dev/null"
            if self._started:
                kill = f'[ "$({_proc_fields(str(pid))} | cut -d" " -f2)" != {shlex.quote(self._started)} ] || {{ {kill}; }}'
            try:
                await self._run(self.host, f"{kill}; true")
            except LaunchError as exc:
                self.log.warning("kernel %s: could not kill the launcher on %s: %s", self.kernel_id, self.host, exc)
            else:
                watch = HOSTS.watches.get(self._host_key(self.host))
                if self._reattached and watch is not None and self.kernel_id in watch.launchers:
                    watch.status.setdefault(self.kernel_id, -9)  # killed: no need to wait for the next check
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
        self._unwatch()
        self._pid = None
        self._started = ""
        if not restart:
            self._release_host()

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Calls ``super()`` first; adds the host, the launcher's pid and start time there, and the kernel's user."""
        info = await super().get_provisioner_info()
        info.update(host=self.host, remote_pid=self._pid, remote_started=self._started, user=self._user)
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Calls ``super()`` first; watches the stored launcher by pid on its host (one check per host for all
        re-attached kernels), waiting for the first check so that ``poll()`` is right from the start."""
        await super().load_provisioner_info(provisioner_info)
        self._unwatch()
        self._channel = None
        self._pid, self._started = provisioner_info.get("remote_pid"), provisioner_info.get("remote_started") or ""
        self._user = provisioner_info.get("user") or ""
        host = provisioner_info.get("host")
        if not host or not self._pid:
            return
        if self.host != host:
            self._release_host()
            self.host = HOSTS.take(host)
        self._reattached = True
        key = self._host_key(host)
        watch = HOSTS.watches.get(key) or HOSTS.watches.setdefault(key, _PidWatch(host))
        await watch.add(self.kernel_id, int(self._pid), self._started, self._run, self.reattach_poll_interval)

    def _unwatch(self) -> None:
        if self._reattached and self.host:
            watch = HOSTS.watches.get(self._host_key(self.host))
            if watch is not None:
                watch.remove(self.kernel_id)
        self._reattached = False


def _describe(exc: BaseException) -> str:
    """An exception as text, even when it carries no message (socket timeouts)."""
    return str(exc) or type(exc).__name__


def _env_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name))
