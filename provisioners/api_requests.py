"""Requests each backend makes to its API, counted where it makes them, for the gateway's metrics.

A backend's client calls :func:`count_request` once per request (from any thread); the gateway reads the totals
with :func:`requests_by_backend` when Prometheus scrapes it. Totals only grow, whatever clients come and go.
"""

from __future__ import annotations

import threading
from collections import Counter

__all__ = ["count_request", "requests_by_backend"]

_lock = threading.Lock()
_requests: Counter[str] = Counter()


def count_request(backend: str) -> None:
    """Count one request to ``backend``'s API (``kubernetes``, ``yarn``)."""
    with _lock:
        _requests[backend] += 1


def requests_by_backend() -> dict[str, int]:
    """Requests made so far, by backend."""
    with _lock:
        return dict(_requests)
