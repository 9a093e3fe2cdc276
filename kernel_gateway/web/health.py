"""Handlers for ``/healthz`` (the process answers) and ``/readyz`` (it accepts kernel requests)."""

from __future__ import annotations

from .base import APIHandler


class HealthHandler(APIHandler):
    """``GET /healthz``: 200 while the event loop runs."""

    public = True

    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(APIHandler):
    """``GET /readyz``: 200 once started, 503 while starting or shutting down."""

    public = True

    def get(self) -> None:
        state = self.settings["state"]
        kernels = len(self.registry.kernels)
        self.write_json({"status": state.phase, "kernels": kernels}, 200 if state.phase == "ready" else 503)


default_handlers = [
    (r"/healthz", HealthHandler),
    (r"/readyz", ReadyHandler),
]
