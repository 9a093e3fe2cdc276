"""The HTTP layer: one module per resource; auth, errors and CORS in ``base``."""

from typing import Any

from tornado import web

from . import api, channels, dashboard, health, kernels, kernelspecs, metrics, sessions
from .base import NotFoundHandler

#: Every route, in match order; the app prefixes each with its base URL.
ROUTES = [
    *api.default_handlers,
    *health.default_handlers,
    *metrics.default_handlers,
    *kernels.default_handlers,
    *channels.default_handlers,
    *kernelspecs.default_handlers,
    *sessions.default_handlers,
    *dashboard.default_handlers,
]

__all__ = ["NotFoundHandler", "ROUTES", "make_application"]


def make_application(base_url: str, **settings: Any) -> web.Application:
    """The tornado application: every route under ``base_url``, JSON 404 for the rest."""
    handlers = [(base_url.rstrip("/") + pattern, handler) for pattern, handler in ROUTES]
    return web.Application(handlers, base_url=base_url, default_handler_class=NotFoundHandler, **settings)
