"""Kernel provisioners: where kernels run. Plain jupyter_client provisioners, usable by any host."""

from .errors import BackendError, LaunchError, LaunchTimeoutError, PortRangeError, ProvisionerError
from .ports import PortAllocator, PortRange, parse_port_range

__all__ = [
    "BackendError",
    "LaunchError",
    "LaunchTimeoutError",
    "PortAllocator",
    "PortRange",
    "PortRangeError",
    "ProvisionerError",
    "parse_port_range",
]
