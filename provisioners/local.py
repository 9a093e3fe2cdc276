"""Local kernels (child processes of the host) whose ports all lie inside a configured range."""

from __future__ import annotations

from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from traitlets import TraitError, Unicode, validate

from .envconfig import EnvConfigurable
from .errors import PortRangeError
from .ports import KERNEL_PORT_COUNT, PortAllocator, parse_port_range

__all__ = ["PortRangeLocalProvisioner"]

_PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


class PortRangeLocalProvisioner(LocalProvisioner, EnvConfigurable):  # type: ignore[misc]
    """jupyter_client's local provisioner, with every kernel port drawn from ``port_range``.

    Ports are reserved in the process-wide :class:`PortAllocator` from ``pre_launch`` until the
    kernel is cleaned up for good; a restart keeps them, so clients reconnect to the same ports.
    """

    port_range = Unicode(
        "",
        config=True,
        help="Ports the kernel may listen on, 'low..high' inclusive; empty means any free port "
        "(env: GATEWAY_PORT_RANGE).",
    )
    port_range_env = "GATEWAY_PORT_RANGE"

    _held_ports: tuple[int, ...] = ()

    @validate("port_range")
    def _validate_port_range(self, proposal: dict[str, Any]) -> str:
        try:
            parse_port_range(proposal["value"])
        except PortRangeError as exc:
            raise TraitError(str(exc)) from exc
        return proposal["value"].strip()

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Reserve ports in the range, then let the local provisioner write the connection file.

        Called by ``KernelManager.pre_start_kernel`` before every (re)start.
        """
        port_range = parse_port_range(self.port_range)
        km = self.parent
        if port_range is not None and km is not None:
            if not self._held_ports:
                self._held_ports = tuple(PortAllocator.instance().allocate(KERNEL_PORT_COUNT, port_range, km.ip))
            km.cache_ports = False
            for name, port in zip(_PORT_NAMES, self._held_ports):
                setattr(km, name, port)
        return await super().pre_launch(**kwargs)

    async def cleanup(self, restart: bool = False) -> None:
        """Release the ports unless the kernel is restarting. Called from ``KernelManager.cleanup_resources``."""
        await super().cleanup(restart=restart)
        if not restart and self._held_ports:
            PortAllocator.instance().release(self._held_ports)
            self._held_ports = ()

    def get_provisioner_info(self) -> dict[str, Any]:
        info = super().get_provisioner_info()
        info["held_ports"] = list(self._held_ports)
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        self._held_ports = tuple(provisioner_info.get("held_ports", ()))
