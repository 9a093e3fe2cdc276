"""The HTTP layer: one module per resource; auth, errors and CORS in ``base``."""

from . import api, channels, health, kernels, kernelspecs, sessions
from .base import NotFoundHandler

#: Every route, in match order; the app prefixes each with its base URL.
ROUTES = [
    *api.default_handlers,
    *health.default_handlers,
    *kernels.default_handlers,
    *channels.default_handlers,
    *kernelspecs.default_handlers,
    *sessions.default_handlers,
]

__all__ = ["NotFoundHandler", "ROUTES"]
