"""Handlers for ``/healthz`` (the process answers) and ``/readyz`` (it accepts kernel requests)."""

from __future__ import annotations

from .base import APIHandler


class HealthHandler(APIHandler):
    """``GET /healthz``: 200 while the event loop runs."""

    public = True

    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(APIHandler):
    """``GET /readyz``: 200 once started, 503 while starting, shutting down, or re-attaching the kernels it kept
    (a kernel store that cannot be read keeps it there: a load balancer then sends clients elsewhere)."""

    public = True

    def get(self) -> None:
        phase = self.settings["state"].phase
        if phase == "ready" and self.registry.restoring:
            phase = "re-attaching kept kernels"
        kernels = len(self.registry.kernels)
        self.write_json({"status": phase, "kernels": kernels}, 200 if phase == "ready" else 503)


default_handlers = [
    (r"/healthz", HealthHandler),
    (r"/readyz", ReadyHandler),
]
