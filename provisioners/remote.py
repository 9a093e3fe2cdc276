"""The remote provisioner contract: launch a launcher somewhere, wait for its handshake, connect.

Subclasses (SSH, Docker, YARN, Kubernetes) implement how a launcher is started, watched and
killed; this base does the rest the same way for all of them: argv placeholders, the launch
token, waiting for the encrypted connection info with the launch timeout (failing early, with the
backend's diagnostics, when the backend reports the launch dead), signals through the launcher's
authenticated control port, and cleanup that leaves nothing running after a failed start.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import re
import secrets
import signal
import socket
import time
from abc import abstractmethod
from typing import Any

from jupyter_client.provisioning import KernelProvisionerBase
from traitlets import Float, List, Unicode

from ._payloads import seal_start_request
from .encryption import SERVER_KEY_ONLY, TransportEncryption
from .errors import BackendError, LaunchError, LaunchRequestError, LaunchTimeoutError
from .handshake import LaunchInfo, ResponseListener
from .ports import PortRangeOption
from .warm import WarmStartable

__all__ = ["RemoteProvisioner", "control_request", "impersonated_user", "is_user_name", "route_address"]

_USER_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")


def is_user_name(name: str) -> bool:
    """Whether ``name`` is a plain POSIX user name (inert in a command line, a URL or a shell ``eval``)."""
    return bool(_USER_NAME.match(name))


def route_address(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (blocking: name resolution; run it off the loop).

    A connected UDP socket makes the kernel pick the route and source address; nothing is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        return sock.getsockname()[0]


def impersonated_user(env: dict[str, str]) -> str:
    """The client's ``KERNEL_USERNAME`` to run a kernel as; :class:`LaunchRequestError` unless it is a user name."""
    user = env.get("KERNEL_USERNAME", "")
    if not is_user_name(user):
        raise LaunchRequestError(f"KERNEL_USERNAME {user!r} is not a valid user name for impersonation")
    return user



_MAX_REPLY = 4096  # bytes of a launcher's one-line reply


async def control_request(host: str, port: int, key: bytes, request: dict[str, Any], timeout: float = 5.0) -> None:
    """Send one authenticated request to a launcher's control port; raise :class:`BackendError` on failure.

    ``timeout`` bounds the whole exchange (connect, send, reply), not each step.
    """
    nonce, stamp = secrets.token_hex(16), int(time.time())
    body = f"{nonce}{stamp}".encode() + json.dumps(request, sort_keys=True, separators=(",", ":")).encode()
    message = {"request": request, "nonce": nonce, "time": stamp, "mac": hmac.new(key, body, hashlib.sha256).hexdigest()}
    where = f"launcher control port {host}:{port}"
    try:
        line = await asyncio.wait_for(_exchange(host, port, json.dumps(message).encode() + b"\n", True), timeout)
        reply = json.loads(line or b"{}")
    except asyncio.TimeoutError as exc:  # before OSError: TimeoutError is one since Python 3.11
        raise BackendError(f"{where} did not answer within {timeout:g}s") from exc
    except (OSError, ValueError) as exc:
        raise BackendError(f"{where} did not answer: {exc or type(exc).__name__}") from exc
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error") if isinstance(reply, dict) else None
        raise BackendError(f"launcher refused the request: {error or 'no reason given'}")


async def _legacy_control_request(host: str, port: int, request: dict[str, Any], timeout: float = 5.0) -> None:
    """Enterprise Gateway's comm-port protocol: one JSON object, no reply, no authentication."""
    where = f"Enterprise Gateway launcher comm port {host}:{port}"
    try:
        await asyncio.wait_for(_exchange(host, port, json.dumps(request).encode(), False), timeout)
    except asyncio.TimeoutError as exc:
        raise BackendError(f"{where} did not answer within {timeout:g}s") from exc
    except OSError as exc:
        raise BackendError(f"{where} did not answer: {exc}") from exc


async def _exchange(host: str, port: int, data: bytes, reply: bool) -> bytes:
    """Connect, send ``data``, read one reply line if ``reply``; the caller bounds the time."""
    reader, writer = await asyncio.open_connection(host, port, limit=_MAX_REPLY)
    try:
        writer.write(data)
        await writer.drain()
        return await reader.readline() if reply else b""
    finally:
        writer.close()


class RemoteProvisioner(KernelProvisionerBase, WarmStartable, TransportEncryption):  # type: ignore[misc]
    """Base of every provisioner whose kernel runs under a launcher on another host or in a container.

    The kernelspec's argv runs the launcher; these placeholders are substituted: ``{kernel_id}``,
    ``{response_address}``, ``{public_key}``, ``{port_range}``, ``{kernel_class_name}``.

    When the kernel is to be encrypted (``transport_encryption``) the launcher gets ``--curve`` (a container
    started with its image's command gets ``TRANSPORT_ENCRYPTION=curve``): it makes the kernel's CurveZMQ key
    pair and reports only the public key (``curve_publickey`` of the connection info).
    """

    port_range = PortRangeOption(
        "",
        config=True,
        help="Ports the remote kernel and its launcher may listen on, 'low..high'; empty means any.",
    ).tag(env="GATEWAY_PORT_RANGE")
    launch_timeout = Float(
        60.0,
        config=True,
        help="Seconds to wait for the launcher's connection info; a client's KERNEL_LAUNCH_TIMEOUT, already "
        "capped by the gateway, overrides it.",
    ).tag(env="GATEWAY_KERNEL_LAUNCH_TIMEOUT")
    response_host = Unicode(
        "",
        config=True,
        help="Host name or address launchers use to reach the response listener; empty lets the backend pick "
        "the local address of its connection to the kernel's host.",
    ).tag(env="GATEWAY_RESPONSE_HOST")
    instance_name = Unicode(
        "",
        config=True,
        help="Name of this gateway where its kernels run; kernels carry it (container label, YARN application tag) "
        "and a gateway that starts again under the same name removes the kernels its previous run left behind. "
        "Empty: the host name.",
    ).tag(env="GATEWAY_INSTANCE_NAME")
    forward_envs = List(
        Unicode(),
        config=True,
        help="Variables of the kernel's environment sent to the remote kernel besides KERNEL_* and the kernelspec's "
        "env; empty sends only those. Our gateway fills it from GatewayPolicy.client_envs and inherited_envs.",
    ).tag(env="GATEWAY_FORWARD_ENVS")
    kernel_class_name = Unicode(
        "ipykernel.ipkernel.IPythonKernel",
        config=True,
        help="Kernel class the Python launcher runs.",
    ).tag(env="GATEWAY_KERNEL_CLASS_NAME")

    launch_info: LaunchInfo | None = None
    warm_launch: LaunchInfo | None = None  # a warm launcher waiting for its start request (pools)
    curve = False  # the current launch asked the launcher for CurveZMQ encryption
    launch_values: dict[str, str] = {}  # the placeholder values of the current launch
    _token: str | None = None
    _stop_requested = False  # the gateway asked this launch to end (shutdown, kill, terminate)
    _exit_logged: LaunchInfo | None = None  # the launch whose end poll() has logged

    @property
    def listener(self) -> ResponseListener:
        return ResponseListener.instance(parent=self)

    # -- what a backend implements -----------------------------------------------------------------
    @abstractmethod
    async def start_launcher(self, cmd: list[str], env: dict[str, str], token: str) -> None:
        """Start ``cmd`` on the backend with ``env``, handing it ``token`` without putting it on a command line.

        Called from :meth:`launch_kernel`; raise :class:`LaunchError` (or a subclass) with the backend's reason.
        """

    @abstractmethod
    def launcher_exit_status(self) -> int | None:
        """The launcher's exit status if it has ended, else None. Must not block: read shared watcher state."""

    @abstractmethod
    async def kill_launcher(self) -> None:
        """Forcefully end the launcher and its kernel on the backend; must succeed if already gone."""

    async def launch_diagnostics(self) -> str:
        """Text that helps explain a failed launch (e.g. the tail of the remote log); '' when none."""
        return ""

    async def advertised_host(self) -> str:
        """The address launchers should use for the response listener. Override to pick it per backend."""
        return self.response_host or "127.0.0.1"

    # -- the provisioner contract --------------------------------------------------------------------
    @property
    def has_process(self) -> bool:
        """True from the start of a launch, and after :meth:`load_provisioner_info` restored a running one."""
        return self.launch_info is not None or self._token is not None or self.warm_launch is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Start the listener, register the launch, substitute argv placeholders.

        Called by ``KernelManager.pre_start_kernel`` before every (re)start; calls ``super()`` last.
        """
        self.curve = self.encrypts()  # before anything is registered: may refuse the request
        await self.listener.start()
        self.launch_info = None
        public_key = self.public_key_for_argv()  # before registering: fails when EG launchers are not accepted
        # only a launch that runs an EG launcher (handed the RSA key) may be completed by EG's tokenless payload
        self._token = self.listener.register(self.kernel_id, enterprise_gateway=self.runs_enterprise_gateway_launcher)
        if self.warm_launch is not None:  # handed out: the waiting launcher knows where to report already
            response_address = self.launch_values["response_address"]
        else:
            response_address = f"{await self.advertised_host()}:{self.listener.port}"
        values = {
            "kernel_id": self.kernel_id,
            "response_address": response_address,
            "public_key": public_key,
            "port_range": self.port_range or "0..0",
            "kernel_class_name": self.kernel_class_name,
        }
        self.launch_values = values
        cmd = [_substitute(arg, values) for arg in self.kernel_spec.argv]
        if self.curve:
            cmd.append("--curve")
        kwargs.pop("extra_arguments", None)
        return await super().pre_launch(cmd=cmd, **kwargs)

    @property
    def instance_label(self) -> str:
        """``instance_name``, or this host's name."""
        return self.instance_name or socket.gethostname()

    def kernel_supports_curve(self) -> bool:
        """The kernelspec declares CurveZMQ and runs our launcher (Enterprise Gateway's do not know ``--curve``)."""
        return not self.runs_enterprise_gateway_launcher and super().kernel_supports_curve()

    def manager_supports_curve(self) -> bool:
        """The launcher reports only the kernel's public key: jupyter_client's own kernel manager cannot connect
        with that alone (in a jupyter_server host such kernels run unencrypted); the gateway's can."""
        return bool(getattr(self.parent, SERVER_KEY_ONLY, False))

    @property
    def runs_enterprise_gateway_launcher(self) -> bool:
        """Whether the spec's argv runs an Enterprise Gateway launcher (its ``--RemoteProcessProxy.*`` options)."""
        return any("RemoteProcessProxy" in arg for arg in self.kernel_spec.argv)

    def public_key_for_argv(self) -> str:
        """``{public_key}``: ours, or the RSA key when the spec runs an Enterprise Gateway launcher."""
        return self.listener.eg_public_key if self.runs_enterprise_gateway_launcher else self.listener.public_key

    def _launcher_env(self, env: dict[str, str]) -> dict[str, str]:
        """What of the kernel's environment travels to the launcher."""
        # an allow-list: a host process's environment (tokens, credentials) never travels to kernel hosts
        forwarded = {*self.forward_envs, *(self.kernel_spec.env or {})}
        env = {k: v for k, v in env.items() if k.startswith("KERNEL_") or k in forwarded}
        env.update(KERNEL_ID=self.kernel_id, KERNEL_LANGUAGE=self.kernel_spec.language or "")
        return env

    async def warm_up(self, **kwargs: Any) -> None:
        """Start the launcher warm: it reports its control port and waits; ``launch_kernel`` hands it the request.

        The launcher gets the kernelspec's environment only (the request's comes at hand-out), on the backend
        and host a cold start would pick for a request that asks for nothing in particular.
        """
        kwargs = await self.pre_launch(env={})
        env = dict(self._launcher_env(kwargs["env"]), KERNEL_LAUNCHER_WARM="1")
        assert self._token is not None
        try:
            await self.start_launcher(kwargs["cmd"], env, self._token)
            info = await self._await_handshake(self.launch_timeout)
            if not info.warm:
                raise LaunchError(f"kernel {self.kernel_id}: the launcher started a kernel instead of waiting warm "
                                  "(a launcher older than warm starts: update the kernel image or host)")
        except BaseException:
            self.listener.unregister(self.kernel_id)
            await self.kill_launcher()
            raise
        self.warm_launch, self._token = info, None

    def warm_ended(self) -> bool:
        return self.warm_launch is None or self.launcher_exit_status() is not None

    async def discard_warm(self) -> None:
        await self.kill_launcher()
        await self.cleanup()

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> dict[str, Any]:
        """Start the launcher (or hand the warm one the request) and wait for its connection info; kill everything
        if that fails."""
        env = self._launcher_env(kwargs.get("env", {}))
        timeout = _timeout(env.get("KERNEL_LAUNCH_TIMEOUT"), self.launch_timeout)
        assert self._token is not None
        warm, self.warm_launch = self.warm_launch, None
        try:
            if warm is not None:
                sealed = seal_start_request(warm.control_key or b"", {"launch_token": self._token, "env": env})
                await control_request(warm.connection_info["ip"], warm.control_port or 0, warm.control_key or b"",
                                      {"start": sealed})
            else:
                await self.start_launcher(cmd, env, self._token)
            self.launch_info = await self._await_handshake(timeout)
            if self.curve and not self.launch_info.connection_info.get("curve_publickey"):
                raise LaunchError(f"kernel {self.kernel_id}: transport encryption was asked for but the launcher "
                                  "reported no CurveZMQ key (is its launch_ipykernel.py older than the gateway?)",
                                  kernel_id=self.kernel_id)
        except BaseException:
            self.listener.unregister(self.kernel_id)
            await self.kill_launcher()
            raise
        self._token = None
        self.connection_info = dict(self.launch_info.connection_info)
        if isinstance(self.connection_info.get("key"), str):
            self.connection_info["key"] = self.connection_info["key"].encode()  # jupyter_client compares bytes
        self.log.info("kernel %s connected from %s", self.kernel_id, self.launch_info.hostname or self.connection_info.get("ip"))
        return self.connection_info

    async def _await_handshake(self, timeout: float) -> LaunchInfo:
        deadline = time.monotonic() + timeout
        handshake = asyncio.ensure_future(self.listener.wait(self.kernel_id))
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    detail = await self.launch_diagnostics()
                    raise LaunchTimeoutError(
                        f"kernel {self.kernel_id}: no connection info from the launcher within {timeout:g}s"
                        + (f"; {detail}" if detail else ""), kernel_id=self.kernel_id)
                done, _ = await asyncio.wait({handshake}, timeout=min(0.5, remaining))
                if done:
                    return handshake.result()
                status = self.launcher_exit_status()
                if status is not None:
                    detail = await self.launch_diagnostics()
                    raise LaunchError(
                        f"kernel {self.kernel_id}: the launcher exited with status {status} before reporting"
                        + (f"; {detail}" if detail else ""), kernel_id=self.kernel_id)
        finally:
            handshake.cancel()

    async def poll(self) -> int | None:
        """None while the launcher runs, else its exit status (from the backend's shared watcher).

        The first time it finds a running kernel's launcher ended, logs the status; unless the gateway
        asked the kernel to stop, as a warning with the backend's diagnostics (the launcher's last words).
        """
        status = self.launcher_exit_status()
        if status is not None and self.launch_info is not None and self._exit_logged is not self.launch_info:
            self._exit_logged = self.launch_info
            if self._stop_requested:
                self.log.info("kernel %s: the launcher exited with status %s", self.kernel_id, status)
            else:
                detail = await self.launch_diagnostics()
                self.log.warning("kernel %s: the launcher exited with status %s%s", self.kernel_id, status,
                                 f"; {detail}" if detail else "")
        return status

    async def shutdown_requested(self, restart: bool = False) -> None:
        """Called by ``KernelManager.request_shutdown``: the launcher's exit is expected from now on."""
        self._stop_requested = True

    async def wait(self) -> int | None:
        while (status := self.launcher_exit_status()) is None:
            await asyncio.sleep(0.2)
        return status

    async def send_signal(self, signum: int) -> None:
        """Deliver ``signum`` through the launcher's authenticated control port; nothing when the launcher has ended
        (jupyter_client interrupts before a shutdown or an automatic restart of a kernel that died)."""
        if self.launcher_exit_status() is not None:
            return
        info = self.launch_info
        if info is None or info.control_port is None:
            raise BackendError(f"kernel {self.kernel_id} has no launcher control port to signal")
        if info.legacy:  # an Enterprise Gateway launcher: its comm port takes plain JSON
            await _legacy_control_request(self.connection_info["ip"], info.control_port, {"signum": int(signum)})
        elif info.control_key is not None:
            await control_request(self.connection_info["ip"], info.control_port, info.control_key, {"signum": int(signum)})
        else:  # a record written before control keys were kept
            raise BackendError(f"kernel {self.kernel_id}: the launcher's control key is unknown, so it cannot be "
                               "signalled; use message-mode interrupts or restart the kernel")

    async def kill(self, restart: bool = False) -> None:
        self._stop_requested = True
        await self.kill_launcher()

    async def terminate(self, restart: bool = False) -> None:
        self._stop_requested = True
        try:
            await self.send_signal(signal.SIGTERM)
        except BackendError:
            await self.kill_launcher()

    async def cleanup(self, restart: bool = False) -> None:
        self.listener.unregister(self.kernel_id)
        self.launch_info = self.warm_launch = None
        self._token = None
        self._stop_requested = False

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Calls ``super()`` first; adds the launch (control port and key, launcher pid and host) when there is one.

        JSON-safe apart from the base's ``connection_info`` (its ``key`` is bytes). The control key is a secret:
        the kernel store keeps it only in sealed records. Subclasses call ``super()`` first and add their own keys.
        """
        info = await super().get_provisioner_info()
        launch = self.launch_info
        if launch is not None:
            key = base64.b64encode(launch.control_key).decode() if launch.control_key else None
            info.update(pid=launch.pid, pgid=launch.pgid, hostname=launch.hostname, control_port=launch.control_port,
                        control_key=key, legacy=launch.legacy)
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Calls ``super()`` first; restores the launch :meth:`get_provisioner_info` recorded, so that a later
        gateway polls, signals (through the control port), kills and cleans up the kernel as if it had started it.

        ``connection_info`` may be in ``provisioner_info`` (its ``key`` str or bytes) or already set on this
        provisioner. Subclasses call ``super()`` first, then watch their backend's object again; ``poll()`` must
        then give the exit status of a kernel that is gone rather than raise.
        """
        info = dict(provisioner_info)
        info.setdefault("connection_info", self.connection_info)
        await super().load_provisioner_info(info)
        connection = dict(self.connection_info or {})
        if isinstance(connection.get("key"), str):
            connection["key"] = connection["key"].encode()  # JSON gave back text; jupyter_client compares bytes
        self.connection_info = connection
        self._token, self._stop_requested, self._exit_logged = None, False, None
        self.launch_info = None
        if "control_port" in info:  # written only for a launch that completed its handshake
            key = info.get("control_key")
            try:
                control_key = base64.b64decode(key, validate=True) if key else None
            except ValueError:
                raise BackendError(f"kernel {self.kernel_id}: the stored control key is not base64") from None
            self.launch_info = LaunchInfo(connection_info=dict(connection), control_port=info.get("control_port"),
                                          control_key=control_key, pid=info.get("pid"), pgid=info.get("pgid"),
                                          hostname=info.get("hostname") or "", legacy=bool(info.get("legacy")))


def _substitute(arg: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        arg = arg.replace("{" + name + "}", value)
    return arg


def _timeout(client_value: str | None, default: float) -> float:
    """The client's KERNEL_LAUNCH_TIMEOUT if it is a positive finite number of seconds, else ``default``."""
    try:
        value = float(client_value) if client_value else default
    except ValueError:
        return default
    return value if math.isfinite(value) and value > 0 else default
