"""The metrics module on its own: failure reasons, relay tallies, store timing, the loop-lag sampler, the scrape."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kernel_gateway import metrics
from kernel_gateway.errors import LimitError, NotReadyError
from kernel_gateway.kernels import KernelPools
from provisioners.api_requests import count_request, requests_by_backend
from provisioners.errors import BackendError, CapacityError, LaunchError, LaunchTimeoutError, PortRangeError


@pytest.mark.parametrize("exc, reason", [
    (LaunchTimeoutError("x"), "timeout"), (CapacityError("x"), "capacity"), (PortRangeError("x"), "ports"),
    (BackendError("x"), "backend"), (LaunchError("x"), "launch"), (NotReadyError("x"), "not_ready"),
    (LimitError("x"), "error"), (RuntimeError("x"), "error"),
])
def test_start_failure_reasons_come_from_a_fixed_set(exc, reason):
    assert metrics.start_failure_reason(exc) == reason


def test_tallies_count_messages_and_frame_bytes():
    tally = metrics.Tally()
    tally.add_batch([[b"ab", b"cde"], [b"f"]])
    tally.add([b"1234", memoryview(b"56")])
    assert (tally.messages, tally.bytes) == (3, 12)


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_store_calls_are_timed_and_failures_counted():
    before = sample("kernel_gateway_store_operation_duration_seconds_count", store="unit", operation="put")
    with metrics.store_call("unit", "_put"):
        pass
    with pytest.raises(OSError), metrics.store_call("unit", "_put"):
        raise OSError("disk full")
    assert sample("kernel_gateway_store_operation_duration_seconds_count", store="unit", operation="put") == before + 2
    assert sample("kernel_gateway_store_errors_total", store="unit", operation="put") >= 1


async def test_the_lag_monitor_sees_a_blocked_loop():
    monitor = metrics.LoopLagMonitor(interval=0.05)
    before = sample("kernel_gateway_event_loop_lag_seconds_sum")
    monitor.start()
    await asyncio.sleep(0)  # one loop iteration: the monitor notes the time and starts its sleep
    time.sleep(0.3)  # blocks the event loop on purpose: that is what the monitor measures
    deadline = time.monotonic() + 10
    while sample("kernel_gateway_event_loop_lag_seconds_sum") - before < 0.2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # until the monitor wakes up late and observes it
    monitor.stop()
    assert sample("kernel_gateway_event_loop_lag_seconds_sum") - before >= 0.2


DOCS = Path(__file__).resolve().parents[2] / "docs" / "operators" / "metrics.md"


class _Registry:
    kernels: dict = {}
    starting: dict = {}

    def __init__(self) -> None:
        self.pools = KernelPools(self)  # no pools: their series are served anyway, empty


def test_the_scrape_has_no_created_samples_and_counts_backend_requests():
    count_request("unit-backend")
    text = metrics.exposition(_Registry()).decode()
    assert "_created" not in text
    found = {(s.name, s.labels.get("backend")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert found["kernel_gateway_backend_api_requests_total", "unit-backend"] == requests_by_backend()["unit-backend"]


def test_the_docs_list_exactly_the_series_served():
    documented = set(re.findall(r"`((?:kernel_gateway|process)_[a-z_]+)`", DOCS.read_text()))
    families = text_string_to_metric_families(metrics.exposition(_Registry()).decode())
    # the parser names counter families without the _total of their samples, the docs with it
    served = {family.name + ("_total" if family.type == "counter" else "") for family in families}
    assert served == documented
