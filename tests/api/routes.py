"""The server's route table (``kernel_gateway.web.ROUTES``) as OpenAPI templated paths and methods."""

from __future__ import annotations

import re

from tornado import web

from kernel_gateway.web import ROUTES

#: Methods a route documents; OPTIONS (CORS preflight) and HEAD are answered implicitly.
DOCUMENTED_METHODS = ("get", "post", "put", "patch", "delete")


def openapi_path(pattern: str) -> str:
    """``/api/kernels/(?P<kernel_id>...)/?`` -> ``/api/kernels/{kernel_id}``."""
    path = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern)
    if path.endswith("/?"):
        path = path[:-2]
    path = path.replace("\\.", ".")
    if not re.fullmatch(r"(/[\w.{}]+)+", path):
        raise ValueError(f"route {pattern!r} does not map to an OpenAPI path (got {path!r})")
    return path


def handler_methods(handler: type) -> set[str]:
    """HTTP methods the handler class implements itself (not tornado's 405 defaults)."""
    return {m for m in DOCUMENTED_METHODS if getattr(handler, m) is not getattr(web.RequestHandler, m)}


def route_table() -> dict[str, set[str]]:
    """OpenAPI path -> implemented methods, for every route the server serves."""
    table: dict[str, set[str]] = {}
    for pattern, handler in ROUTES:
        table.setdefault(openapi_path(pattern), set()).update(handler_methods(handler))
    return table
