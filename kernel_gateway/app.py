"""The gateway application: options, start-up validation, the HTTP server, clean shutdown."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_core.paths import jupyter_config_path
from traitlets import Bool, CaselessStrEnum, Float, Integer, List, TraitError, Type, Unicode, default, validate
from traitlets.config import Application

from provisioners.eg_compat import CompatKernelSpecManager, EnterpriseGatewaySpecError
from provisioners.encryption import check_policy, transport_encryption_option
from provisioners.envconfig import EnvConfigurable
from provisioners.ports import PortRangeOption
from provisioners.handshake import ResponseListener

from . import __version__
from .connections import CHANNELS_WEIGHT, GatewayHTTPServer, default_max_connections, raise_descriptor_limit
from .kernels import KernelCuller, KernelPools, KernelRegistry
from .logs import configure_logging, log_request
from .gc_pauses import FullCollectionPacer
from .metrics import LoopLagMonitor
from .policy import GatewayPolicy
from .sessions import SessionStore
from .startup_checks import validate_all, validate_kernelspecs
from .store import KernelStore, KernelStoreOptions, StoreUnavailable, open_store
from .web import make_application

__all__ = ["GatewayApp", "main"]

DEFAULT_PROVISIONER = "local-port-range-provisioner"
#: Seconds between attempts to read the kernel store when it could not be read at start-up.
RESTORE_RETRY = 10.0

aliases = {
    "ip": "GatewayApp.ip",
    "port": "GatewayApp.port",
    "auth-token": "GatewayApp.auth_token",
    "base-url": "GatewayApp.base_url",
    "port-range": "GatewayApp.port_range",
    "default-kernel": "KernelRegistry.default_kernel_name",
    "config": "GatewayApp.config_file",
    "log-level": "GatewayApp.log_level",
    "transport-encryption": "GatewayApp.transport_encryption",
}
flags = {
    "no-auth": (
        {"GatewayApp": {"allow_unauthenticated_access": True}},
        "Serve without a token (anyone who reaches the port can run code). Logs a warning.",
    ),
    "allow-unauthenticated-channels": (
        {"GatewayApp": {"allow_unauthenticated_channels": True}},
        "Let kernel websockets connect without a token (for nbclient/papermill's GatewayKernelManager).",
    ),
    "accept-enterprise-gateway": (
        {"CompatKernelSpecManager": {"accept_enterprise_gateway": True},
         "ResponseListener": {"accept_enterprise_gateway": True}},
        "Serve Enterprise Gateway kernelspecs and accept EG launcher payloads (while migrating from EG).",
    ),
    "allow-unauthenticated-metrics": (
        {"GatewayApp": {"allow_unauthenticated_metrics": True}},
        "Serve GET /metrics without a token (for a Prometheus scraper that sends none).",
    ),
    "json-logs": ({"GatewayApp": {"json_logs": True}}, "Log JSON lines."),
    "debug": ({"Application": {"log_level": logging.DEBUG}}, "Log debug messages."),
}


@dataclass
class ServerState:
    """What ``/readyz`` reports: starting, ready or stopping."""

    phase: str = "starting"


def _provisioner_classes() -> list[type]:
    """Provisioner classes installed under ``jupyter_client.kernel_provisioners`` that are ours to document."""
    entries = KernelProvisionerFactory._get_all_provisioners()
    return [entry.load() for entry in sorted(entries, key=lambda e: e.name) if entry.value.startswith("provisioners.")]


class GatewayApp(EnvConfigurable, Application):
    """``kernel-gateway``: serves the Jupyter kernel API over kernels started by provisioners."""

    name = "kernel-gateway"
    version = __version__
    description = "A Jupyter kernel gateway: start kernels locally or on a cluster and reach them over HTTP."
    aliases = aliases
    flags = flags
    subcommands = {
        "image-bootstrap": (
            "provisioners.image_bootstrap.ImageBootstrapApp",
            "Install our launcher and kernel entry point into a kernel image (run it in the image's Dockerfile).",
        ),
        "specs": ("provisioners.specs.SpecsApp", "Write kernelspecs for our provisioners (specs install ssh ...)."),
        "config-reference": (
            "kernel_gateway.config_reference.ConfigReferenceApp",
            "Print the configuration reference (every option, its environment variable and default).",
        ),
    }

    ip = Unicode("127.0.0.1", config=True, help="Address the gateway listens on.").tag(env="GATEWAY_IP")
    port = Integer(8888, config=True, help="TCP port the gateway listens on.").tag(env="GATEWAY_PORT")
    base_url = Unicode("/", config=True, help="Path prefix of every route, e.g. /gateway/.").tag(env="GATEWAY_BASE_URL")
    auth_token = Unicode(
        "",
        config=True,
        help="Token clients must send (Authorization: token|Bearer <t>, or ?token=). Empty: one is generated "
        "and printed at start-up, unless allow_unauthenticated_access is set.",
    ).tag(env="GATEWAY_AUTH_TOKEN")
    port_range = PortRangeOption(
        "",
        config=True,
        help="Ports every kernel (local or remote), every launcher and the response listener may use, 'low..high'; "
        "a kernelspec's kernel_provisioner.config.port_range overrides it for that spec. Empty: any port.",
    ).tag(env="GATEWAY_PORT_RANGE")
    transport_encryption = transport_encryption_option(
        "CurveZMQ encryption of every kernel's ZMQ channels (local and remote): 'auto' encrypts kernels whose "
        "kernelspec lists 'curve' in metadata.supported_encryption (ipykernel 7's and those `kernel-gateway specs "
        "install` writes) and runs the others unencrypted, logged once per kernelspec; 'required' refuses to start "
        "the others (400); 'disabled' never encrypts. A kernelspec's kernel_provisioner.config.transport_encryption "
        "overrides it for that spec.")
    allow_unauthenticated_access = Bool(
        False,
        config=True,
        help="Serve without any token. Anyone who can reach the port can run code; a warning is logged.",
    ).tag(env="GATEWAY_ALLOW_UNAUTHENTICATED_ACCESS")
    allow_unauthenticated_channels = Bool(
        False,
        config=True,
        help="Accept kernel websockets (/api/kernels/{id}/channels) without a token; REST still needs it. "
        "For clients that send no credentials on the websocket (nbclient/papermill via jupyter_server's "
        "GatewayKernelManager): the kernel id, a random UUID only returned to authenticated callers, "
        "then acts as the credential.",
    ).tag(env="GATEWAY_ALLOW_UNAUTHENTICATED_CHANNELS")
    allow_unauthenticated_metrics = Bool(
        False,
        config=True,
        help="Serve GET /metrics (Prometheus) without a token, for a scraper that sends none, e.g. inside the "
        "cluster. Its series carry no kernel ids or user names but show how the gateway is used: let only the "
        "scraper reach the port. Off: /metrics needs the token like the REST API.",
    ).tag(env="GATEWAY_ALLOW_UNAUTHENTICATED_METRICS")
    allow_origin = Unicode(
        "",
        config=True,
        help="Origins allowed for CORS and websockets besides the gateway's own: '*' or a comma-separated "
        "list; empty allows same-origin and origin-less clients only.",
    ).tag(env="GATEWAY_ALLOW_ORIGIN")
    allowed_hosts = List(
        Unicode(),
        config=True,
        help="Host names clients may use to reach kernel websockets when allow_unauthenticated_channels is on, "
        "besides IP addresses, localhost and the ip option (a DNS-rebinding page names its own host, so it is "
        "refused); '*' allows any. Empty: only those.",
    ).tag(env="GATEWAY_ALLOWED_HOSTS")

    @validate("allowed_hosts")
    def _host_names(self, proposal: dict[str, Any]) -> list[str]:
        names = [name.strip().lower() for name in proposal["value"] if name.strip()]
        bad = [name for name in names if "/" in name or ":" in name or " " in name]
        if bad:
            raise TraitError(f"allowed_hosts takes bare host names (no scheme, port or path), not {bad}")
        return names

    max_body_size = Integer(
        1024 * 1024,
        config=True,
        help="Largest request body accepted, in bytes; larger ones get 413.",
    ).tag(env="GATEWAY_MAX_BODY_SIZE")
    ws_ping_interval = Integer(
        30,
        config=True,
        help="Seconds between websocket pings that keep idle connections open through proxies; 0 disables.",
    ).tag(env="GATEWAY_WS_PING_INTERVAL")
    gc_full_collection_interval = Float(
        600.0,
        config=True,
        help="Seconds between garbage collections that scan every object the gateway holds. Between them, objects "
        "that survived a full collection are left out of later ones (gc.freeze), so that with thousands of kernels "
        "the collector's pauses stay a few milliseconds instead of hundreds. 0: Python's own collector settings.",
    ).tag(env="GATEWAY_GC_FULL_COLLECTION_INTERVAL")
    idle_connection_timeout = Float(
        60.0,
        config=True,
        help="Seconds a connection may wait for a request's headers, and then for its body, each in total (a "
        "client trickling bytes is cut at the deadline); also how long an idle keep-alive connection stays open. "
        "Must be more than 0.",
    ).tag(env="GATEWAY_IDLE_CONNECTION_TIMEOUT")
    max_connections = Integer(
        0,
        config=True,
        help=f"Descriptors client connections may hold at once: 1 per HTTP connection, {CHANNELS_WEIGHT} per kernel "
        "websocket (its socket and its three ZMQ sockets); websockets may not take the last 1/16, kept for plain "
        "requests such as /healthz. At the cap the oldest connection waiting for a request is closed to make room, "
        "or the new one is answered 503. 0: the open-file limit minus a reserve for kernels (a quarter, at least 64). "
        "Else from 32 to the hard open-file limit.",
    ).tag(env="GATEWAY_MAX_CONNECTIONS")
    max_connections_per_peer = Integer(
        256,
        config=True,
        help="Connections one client address may hold at once; beyond it that address's oldest connection waiting "
        "for a request is closed, or the new one is answered 503. Raise it when all clients arrive through one "
        "proxy. 0: no per-address cap.",
    ).tag(env="GATEWAY_MAX_CONNECTIONS_PER_PEER")
    legacy_binary_frames = CaselessStrEnum(
        ["auto", "always", "never"],
        "auto",
        config=True,
        help="How messages with binary buffers reach legacy-protocol websocket clients: 'always' as legacy binary "
        "frames; 'never' as JSON text frames with base64 buffers; 'auto' sends text frames to jupyter_server's "
        "gateway client (User-Agent Tornado/...), whose relay decodes every frame as UTF-8 and goes silent for good "
        "on a binary one, and binary frames to every other client.",
    ).tag(env="GATEWAY_LEGACY_BINARY_FRAMES")
    json_logs = Bool(
        False,
        config=True,
        help="Log one JSON object a line (for log collectors) instead of text.",
    ).tag(env="GATEWAY_JSON_LOGS")
    config_file = Unicode(
        "",
        config=True,
        help="A Python config file (c.GatewayApp.port = ...). Empty: kernel_gateway_config.py is read from the "
        "Jupyter config path and the working directory if present.",
    ).tag(env="GATEWAY_CONFIG_FILE")

    kernel_spec_manager_class = Type(
        "provisioners.eg_compat.CompatKernelSpecManager",
        klass=KernelSpecManager,
        config=True,
        help="The jupyter_client kernelspec manager; the default also serves Enterprise Gateway kernelspecs when "
        "CompatKernelSpecManager.accept_enterprise_gateway is on.",
    )

    @default("log_level")
    def _log_level_default(self) -> int:
        return logging.INFO

    @validate("port")
    def _valid_port(self, proposal: dict[str, Any]) -> int:
        if not 1 <= proposal["value"] <= 65535:
            raise TraitError(f"port must be between 1 and 65535, not {proposal['value']}")
        return proposal["value"]

    @validate("base_url")
    def _slashes(self, proposal: dict[str, Any]) -> str:
        return "/" + proposal["value"].strip("/") + "/" if proposal["value"].strip("/") else "/"

    @validate("max_body_size")
    def _positive_size(self, proposal: dict[str, Any]) -> int:
        if proposal["value"] < 1024:
            raise TraitError(f"max_body_size must be at least 1024 bytes, not {proposal['value']}")
        return proposal["value"]

    @validate("gc_full_collection_interval")
    def _gc_interval_not_negative(self, proposal: dict[str, Any]) -> float:
        if proposal["value"] < 0:
            raise TraitError(f"gc_full_collection_interval must be 0 (Python's settings) or more seconds, not "
                             f"{proposal['value']}")
        return proposal["value"]

    @validate("idle_connection_timeout")
    def _positive_timeout(self, proposal: dict[str, Any]) -> float:
        if not proposal["value"] > 0:
            raise TraitError(f"idle_connection_timeout must be more than 0 seconds, not {proposal['value']}")
        return proposal["value"]

    @validate("transport_encryption")
    def _curve_built_in(self, proposal: dict[str, Any]) -> str:
        return check_policy(proposal["value"])

    @validate("max_connections")
    def _connections_within_limit(self, proposal: dict[str, Any]) -> int:
        value, hard = proposal["value"], resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if value and (value < 32 or (hard != resource.RLIM_INFINITY and value > hard)):
            raise TraitError(f"max_connections must be 0 (derived from the open-file limit) or between 32 and the "
                             f"hard open-file limit {hard}, not {value}")
        return value

    @validate("max_connections_per_peer")
    def _non_negative_cap(self, proposal: dict[str, Any]) -> int:
        if proposal["value"] < 0:
            raise TraitError(f"max_connections_per_peer must be 0 (no cap) or more, not {proposal['value']}")
        return proposal["value"]

    @property
    def classes(self) -> list[type]:  # type: ignore[override]
        return [GatewayApp, GatewayPolicy, KernelRegistry, KernelPools, KernelStoreOptions, KernelCuller, CompatKernelSpecManager,
                ResponseListener, *_provisioner_classes()]

    def initialize(self, argv: list[str] | None = None) -> None:
        """Parse options, read config, validate everything; exit with a message on any error."""
        try:
            self._initialize(argv)
        except (TraitError, ValueError, OSError, EnterpriseGatewaySpecError) as exc:
            print(f"kernel-gateway: configuration error: {exc}", file=sys.stderr)
            self.exit(2)

    def _initialize(self, argv: list[str] | None) -> None:
        self.parse_command_line(argv)
        if self.subapp is not None:
            return
        configure_logging(self.log_level, "json" if self.json_logs else "text")
        self._read_config_files()
        configure_logging(self.log_level, "json" if self.json_logs else "text")
        self.log = logging.getLogger("kernel_gateway")
        validate_all(self)
        if self.allow_unauthenticated_access and self.auth_token:
            raise TraitError("auth_token and allow_unauthenticated_access contradict each other: choose one")
        self.generated_token = not self.auth_token and not self.allow_unauthenticated_access
        if self.generated_token:
            self.auth_token = secrets.token_hex(24)
        factory_config = self.config.KernelProvisionerFactory
        if "default_provisioner_name" not in factory_config:
            factory_config.default_provisioner_name = DEFAULT_PROVISIONER
        self.policy = GatewayPolicy(parent=self)
        self._share_options()
        self.kernel_spec_manager = self.kernel_spec_manager_class(parent=self)
        self.registry = KernelRegistry(parent=self, policy=self.policy, kernel_spec_manager=self.kernel_spec_manager)
        self.culler = KernelCuller(parent=self, registry=self.registry)
        self.sessions = SessionStore(self.registry)
        store_options = KernelStoreOptions(parent=self)
        for configurable in (self.policy, self.registry, self.registry.pools, self.culler, store_options):
            validate_all(configurable)
        self.registry.store = self._kernel_store(store_options)
        validate_kernelspecs(self.kernel_spec_manager, self.registry)

    def _kernel_store(self, options: KernelStoreOptions) -> KernelStore | None:
        """The kernel store; None when no key is configured and nothing asks for one (kernels then end with us)."""
        keep = self.registry.on_stop == "keep"
        if not (options.key or options.key_file) and options.kind == "sqlite" and not keep:
            self.log.info("kernel store off (no KernelStoreOptions.key_file): kernels end with this gateway")
            return None
        try:
            return open_store(options)
        except StoreUnavailable as exc:
            need = "KernelRegistry.on_stop=keep (GATEWAY_KERNELS_ON_STOP) needs the kernel store: " if keep else ""
            raise TraitError(need + str(exc)) from None

    def _share_options(self) -> None:
        """Hand gateway-wide settings to the provisioner options that mean the same, unless those are set."""
        shared: list[tuple[str, str, Any]] = []
        if self.port_range:
            shared += [("PortRangeLocalProvisioner", "port_range", self.port_range),
                       ("RemoteProvisioner", "port_range", self.port_range),
                       ("ResponseListener", "response_port_range", self.port_range)]
        shared.append(("TransportEncryption", "transport_encryption", self.transport_encryption))
        # what the policy lets into a kernel's environment may also travel to a remote kernel
        forwarded = [*self.policy.client_envs, *self.policy.inherited_envs]
        if forwarded:
            shared.append(("RemoteProvisioner", "forward_envs", forwarded))
        for section, option, value in shared:
            if option not in self.config[section]:
                self.config[section][option] = value

    def _read_config_files(self) -> None:
        if self.config_file:
            if not os.path.isfile(self.config_file):
                raise TraitError(f"config file {self.config_file!r} does not exist")
            directory, filename = os.path.split(os.path.abspath(self.config_file))
            self.load_config_file(filename, path=[directory])
        else:
            self.load_config_file("kernel_gateway_config", path=[*jupyter_config_path(), os.getcwd()])
        # the command line wins over the file
        if self.cli_config:
            self.update_config(self.cli_config)

    # -- serving -------------------------------------------------------------------------------
    def web_app(self, state: ServerState) -> Any:
        """The tornado application with every route under ``base_url``."""
        settings = {
            "auth_token": "" if self.allow_unauthenticated_access else self.auth_token,
            "allow_unauthenticated_channels": self.allow_unauthenticated_channels,
            "allow_unauthenticated_metrics": self.allow_unauthenticated_metrics,
            "allow_origin": self.allow_origin,
            "allowed_hosts": [self.ip.lower(), *self.allowed_hosts],
            "legacy_binary_frames": self.legacy_binary_frames.lower(),
            "max_body_size": self.max_body_size,
            "registry": self.registry,
            "policy": self.policy,
            "sessions": self.sessions,
            "state": state,
            "log_function": log_request,
            "websocket_ping_interval": self.ws_ping_interval or None,
            "websocket_max_message_size": 64 * 1024 * 1024,
            "serve_traceback": False,
        }
        return make_application(self.base_url, **settings)

    def start(self) -> None:
        if self.subapp is not None:
            self.subapp.start()
            return
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        state = ServerState()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        descriptor_limit = raise_descriptor_limit()
        max_connections = self.max_connections or default_max_connections(descriptor_limit)
        # bodies over max_body_size are answered 413 by the handlers; this hard cap only bounds what is read
        server = GatewayHTTPServer(
            self.web_app(state), max_body_size=16 * self.max_body_size, xheaders=False,
            idle_connection_timeout=self.idle_connection_timeout, body_timeout=self.idle_connection_timeout,
            max_connections=max_connections, max_connections_per_peer=self.max_connections_per_peer,
        )
        try:
            server.listen(self.port, self.ip)
        except OSError as exc:
            reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be used: {exc.strerror}"
            self.log.critical("port %s on %s %s", self.port, self.ip, reason)
            raise SystemExit(1) from None
        await self.registry.start()
        restoring = await self._restore_kernels(stop)
        await self.culler.start()
        lag = LoopLagMonitor()
        lag.start()
        pacer = FullCollectionPacer(self.gc_full_collection_interval)
        pacer.start()
        state.phase = "ready"
        self._announce()
        await stop.wait()
        state.phase = "stopping"
        self.log.info("shutting down: %s %d kernels", "keeping" if self.registry.on_stop == "keep" else "stopping",
                      len(self.registry.kernels))
        server.stop()
        if restoring is not None:
            restoring.cancel()
        await self.culler.stop()
        lag.stop()
        pacer.stop()
        await self.registry.stop()
        if ResponseListener._instance is not None:
            await ResponseListener._instance.stop()
        await server.close_all_connections()
        self.log.info("stopped")

    async def _restore_kernels(self, stop: asyncio.Event) -> asyncio.Task | None:
        """Re-attach the kernels an earlier gateway kept. When the store cannot be read, serve anyway (starts get
        503 until it can be written) and return the task that keeps trying."""
        try:
            await self.registry.restore()
            return None
        except StoreUnavailable as exc:
            self.log.error("kept kernels are not served yet; trying again every %gs: %s", RESTORE_RETRY, exc)

        async def retry() -> None:
            while not stop.is_set():
                await asyncio.sleep(RESTORE_RETRY)
                try:
                    await self.registry.restore()
                    self.log.info("the kernel store is readable again")
                    return
                except StoreUnavailable as exc:
                    self.log.warning("still cannot read the kernel store: %s", exc)

        return asyncio.create_task(retry())

    def _announce(self) -> None:
        url = f"http://{self.ip}:{self.port}{self.base_url}"
        self.log.info("kernel gateway %s listening on %s", __version__, url)
        if self.allow_unauthenticated_access:
            self.log.warning("serving WITHOUT authentication: anyone who can reach %s can run code", url)
            print(f"Kernel gateway running at {url} (no authentication)", flush=True)
        elif self.generated_token:
            # printed for the operator who started us, never logged
            print(f"Kernel gateway running at {url}\n    token: {self.auth_token}\n"
                  f"    jupyter lab --gateway-url={url} --GatewayClient.auth_token={self.auth_token}", flush=True)
        else:
            print(f"Kernel gateway running at {url} (token from configuration)", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``kernel-gateway``."""
    started = time.monotonic()
    app = GatewayApp.instance()
    app.initialize(argv)
    app.start()
    logging.getLogger("kernel_gateway").debug("exited after %.1fs", time.monotonic() - started)
