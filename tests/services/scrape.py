"""Reading the gateway's /metrics in tests: the scrape, its samples, and one value."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.services.client import call
from tests.services.gateway import GatewayServer


def scrape(gw, auth: bool = True) -> str:
    status, body, headers = call(gw, "GET", "/metrics", auth=auth)
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4"), headers
    return body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when there is none)."""
    return sum(v for (n, lbls), v in found.items() if n == name and set(labels.items()) <= set(lbls))


def metric(gw: GatewayServer, name: str, **labels: str) -> float:
    """The value of series ``name`` with ``labels`` in a scrape now (summed over other labels; 0 when absent)."""
    return value(samples(scrape(gw)), name, **labels)
