"""Handlers for ``/api`` (version info) and ``/api/spec.yaml`` (the OpenAPI document)."""

from __future__ import annotations

from pathlib import Path

import jupyter_server

from .. import __version__
from .base import APIHandler

SPEC_PATH = Path(__file__).with_name("api.yaml")


class VersionHandler(APIHandler):
    """``GET /api``: the Jupyter server API version clients check, and ours."""

    public = True

    def get(self) -> None:
        self.write_json({"version": jupyter_server.__version__, "gateway_version": __version__})


class SpecHandler(APIHandler):
    """``GET /api/spec.yaml``: the OpenAPI document of every route."""

    public = True

    def get(self) -> None:
        self.set_header("Content-Type", "application/yaml")
        self.finish(SPEC_PATH.read_bytes())


default_handlers = [
    (r"/api/?", VersionHandler),
    (r"/api/spec\.yaml", SpecHandler),
]
