"""Handler for ``/metrics``: the gateway's series in the Prometheus text format (docs/operators/metrics.md)."""

from __future__ import annotations

from .. import metrics
from .base import APIHandler


class MetricsHandler(APIHandler):
    """``GET /metrics``: every series; needs the token unless ``allow_unauthenticated_metrics`` is on."""

    def authenticate(self) -> None:
        if not self.settings.get("allow_unauthenticated_metrics"):
            super().authenticate()

    def get(self) -> None:
        self.set_header("Content-Type", metrics.CONTENT_TYPE)
        self.finish(metrics.exposition(self.registry))


default_handlers = [
    (r"/metrics", MetricsHandler),
]
