"""Errors the server raises on purpose; ``web/`` maps each class to one HTTP status.

    GatewayError                    (500: our bug, reported without a traceback)
     ├── BadRequestError            400  the request body, query or env is malformed
     ├── AuthenticationError        401  no token, or a wrong one
     ├── ForbiddenError             403  the user may not do this
     ├── NotFoundError              404
     │    ├── UnknownKernelError         no kernel with that id
     │    ├── UnknownKernelSpecError     no kernelspec with that name
     │    └── UnknownSessionError        no session with that id
     ├── ConflictError              409  the resource is in a state that forbids this
     ├── PayloadTooLargeError       413  the body is larger than the limit
     ├── LimitError                 429  a kernel limit was reached (numbers in the message)
     ├── NotReadyError              503  starting up or shutting down
     └── KernelStartError           502/504: see provisioners.errors.LaunchError / LaunchTimeoutError

Provisioner errors (``provisioners.errors``) cross into the server as they are; the web layer maps
``LaunchTimeoutError`` to 504 and other ``ProvisionerError``s to 502 with the backend's reason.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "ForbiddenError",
    "GatewayError",
    "LimitError",
    "NotFoundError",
    "NotReadyError",
    "PayloadTooLargeError",
    "UnknownKernelError",
    "UnknownKernelSpecError",
    "UnknownSessionError",
]


class GatewayError(Exception):
    """Root of the server's own errors."""

    def __init__(self, message: str, *, kernel_id: str | None = None) -> None:
        super().__init__(message)
        self.kernel_id = kernel_id


class BadRequestError(GatewayError):
    """The request is malformed."""


class AuthenticationError(GatewayError):
    """The request carries no valid token."""


class ForbiddenError(GatewayError):
    """The user is not allowed to do this."""


class NotFoundError(GatewayError):
    """The named resource does not exist."""


class UnknownKernelError(NotFoundError):
    """No kernel has this id."""


class UnknownKernelSpecError(NotFoundError):
    """No kernelspec has this name."""


class UnknownSessionError(NotFoundError):
    """No session has this id."""


class ConflictError(GatewayError):
    """The resource's state forbids the request."""


class PayloadTooLargeError(GatewayError):
    """The request body is over the size limit."""


class LimitError(GatewayError):
    """A kernel limit was reached."""


class NotReadyError(GatewayError):
    """The gateway is starting up or shutting down."""
