"""Errors raised by provisioners; no HTTP here, the server maps them to status codes.

    ProvisionerError
     ├── PortRangeError          a port range is malformed or exhausted
     ├── LaunchRequestError      the start request asks for something not allowed (bad host, image, ...)
     ├── LaunchError             a kernel could not be started (backend's reason attached)
     │    ├── LaunchTimeoutError the kernel did not become ready in time
     │    └── CapacityError      the backend has no room for the kernel now (e.g. a full YARN queue)
     └── BackendError            the backend (ssh, docker, yarn, kubernetes) failed a request
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "CapacityError",
    "LaunchError",
    "LaunchRequestError",
    "LaunchTimeoutError",
    "PortRangeError",
    "ProvisionerError",
]


class ProvisionerError(Exception):
    """Root of every error a provisioner raises on purpose."""

    def __init__(self, message: str, *, kernel_id: str | None = None) -> None:
        super().__init__(message)
        self.kernel_id = kernel_id


class PortRangeError(ProvisionerError, ValueError):
    """A port range is malformed, or has no free port left."""


class LaunchRequestError(ProvisionerError):
    """The start request asks for something the operator does not allow."""


class LaunchError(ProvisionerError):
    """A kernel could not be started."""


class LaunchTimeoutError(LaunchError):
    """A kernel did not become ready within its launch timeout."""


class CapacityError(LaunchError):
    """The backend cannot take the kernel now (a queue or resource limit); retrying later may succeed."""


class BackendError(ProvisionerError):
    """The backend that runs kernels refused or failed a request."""
