"""Prometheus metrics: the gateway's own registry, the series its parts update, and those read at scrape time.

Events that happen at human rates (kernel starts, restarts, culls, kernel store calls) update prometheus_client
objects in :data:`REGISTRY` where they happen. What happens per message (the websocket bridge's relay) is counted
in plain ints (:class:`Tally`), added to once per batch read from the kernel, and turned into counters only when
Prometheus scrapes; so are values that already live in other objects (kernels by state, open websockets,
launcher connections the response listener dropped, backend API requests). ``docs/operators/metrics.md`` lists
every series; no label ever carries a kernel id or a user name.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator

from jupyter_client.provisioning import KernelProvisionerFactory
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from provisioners.api_requests import requests_by_backend
from provisioners.errors import (BackendError, CapacityError, LaunchError, LaunchRequestError, LaunchTimeoutError,
                                 PortRangeError, ProvisionerError)
from provisioners.handshake import ResponseListener

from . import __version__
from .errors import NotReadyError

__all__ = ["CLIENT_TO_KERNEL", "CONTENT_TYPE", "DROPPED", "KERNEL_TO_CLIENT", "LoopLagMonitor", "REGISTRY", "Tally",
           "exposition", "kernel_provisioner", "provisioner_name", "relayed", "start_failure_reason", "start_phase_ended", "store_call"]

#: The Content-Type of :func:`exposition` (Prometheus text format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The gateway's registry (prometheus_client's global one also holds whatever other libraries register).
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...

_START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

STARTS = Counter("kernel_gateway_kernel_starts", "Kernels started (answered kernel_info), by provisioner.",
                 ["provisioner"], registry=REGISTRY)
START_FAILURES = Counter("kernel_gateway_kernel_start_failures",
                         "Kernel starts that failed after the request was accepted, by provisioner and reason.",
                         ["provisioner", "reason"], registry=REGISTRY)
START_SECONDS = Histogram("kernel_gateway_kernel_start_duration_seconds",
                          "Seconds from the start of a launch until the phase ended: launch (the provisioner's "
                          "start_kernel returned) or ready (the kernel answered kernel_info).",
                          ["provisioner", "phase"], buckets=_START_BUCKETS, registry=REGISTRY)
RESTARTS = Counter("kernel_gateway_kernel_restarts", "Kernel restarts, by provisioner and kind (requested, automatic).",
                   ["provisioner", "kind"], registry=REGISTRY)
SHUTDOWNS = Counter("kernel_gateway_kernel_shutdowns", "Kernels shut down (by request, culling or gateway stop).",
                    ["provisioner"], registry=REGISTRY)
CULLS = Counter("kernel_gateway_kernel_culls", "Kernels shut down by the culler for being idle.", registry=REGISTRY)
WEBSOCKETS_OPENED = Counter("kernel_gateway_websocket_connections_opened",
                            "Kernel websocket connections opened, by encoding (v1, binary, text).",
                            ["encoding"], registry=REGISTRY)
SLOW_CLIENTS = Counter("kernel_gateway_websocket_slow_clients_closed",
                       "Kernel websockets closed (1013) because the client read too slowly.", registry=REGISTRY)
LOOP_LAG = Histogram("kernel_gateway_event_loop_lag_seconds",
                     "How late the event loop ran a timer (sampled every half second).",
                     buckets=_FAST_BUCKETS, registry=REGISTRY)
STORE_SECONDS = Histogram("kernel_gateway_store_operation_duration_seconds",
                          "Seconds a kernel store call took, by store and operation.",
                          ["store", "operation"], buckets=_FAST_BUCKETS, registry=REGISTRY)
STORE_ERRORS = Counter("kernel_gateway_store_errors", "Kernel store calls that failed, by store and operation.",
                       ["store", "operation"], registry=REGISTRY)

#: Why a start failed: the first class in the error's MRO found here names the reason.
_FAILURE_REASONS: dict[type[BaseException], str] = {
    LaunchTimeoutError: "timeout",
    CapacityError: "capacity",
    LaunchRequestError: "bad_request",
    PortRangeError: "ports",
    BackendError: "backend",
    LaunchError: "launch",
    ProvisionerError: "provisioner",
    NotReadyError: "not_ready",
}


def start_failure_reason(exc: BaseException) -> str:
    """The ``reason`` label of a failed start: a small fixed set, from the exception's class."""
    for cls in type(exc).__mro__:
        if cls in _FAILURE_REASONS:
            return _FAILURE_REASONS[cls]
    return "error"


def provisioner_name(spec: Any) -> str:
    """The provisioner a kernelspec names, or the gateway's default provisioner."""
    named = ((getattr(spec, "metadata", None) or {}).get("kernel_provisioner") or {}).get("provisioner_name")
    if named:
        return str(named)
    if KernelProvisionerFactory.initialized():  # never created here: the first kernel manager configures it
        return KernelProvisionerFactory.instance().default_provisioner_name
    return "default"


def kernel_provisioner(kernel: Any) -> str:
    """The ``provisioner`` label of a :class:`~kernel_gateway.kernels.ManagedKernel`."""
    km = kernel.km
    provisioner = getattr(km, "provisioner", None)
    if provisioner is not None:
        return provisioner_name(provisioner.kernel_spec)
    try:  # a start that has not made its provisioner yet: the spec is read (and kept by the manager) now
        return provisioner_name(km.kernel_spec)
    except Exception:  # the kernelspec went away meanwhile: the start will fail and say so
        return "unknown"


def start_phase_ended(kernel: Any, phase: str, started: float) -> None:
    """Observe ``phase`` of a kernel's start as ended now; ``started``: ``time.monotonic()`` when its launch began."""
    START_SECONDS.labels(kernel_provisioner(kernel), phase).observe(time.monotonic() - started)


# -- the bridge's relay, in plain ints ---------------------------------------------------------------------
KERNEL_TO_CLIENT = "kernel_to_client"
CLIENT_TO_KERNEL = "client_to_kernel"


class Tally:
    """Messages and bytes (of their ZMQ frames) as plain ints: the bridge adds to them, a scrape reads them."""

    __slots__ = ("messages", "bytes")

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0

    def add_batch(self, batch: list[list[bytes]]) -> None:
        """Count a batch of multipart messages read from a kernel socket."""
        self.messages += len(batch)
        self.bytes += sum([len(frame) for frames in batch for frame in frames])

    def add(self, frames: list[Any]) -> None:
        """Count one multipart message."""
        self.messages += 1
        self.bytes += sum(map(len, frames))


#: Relay tallies by (channel, direction); channels are the kernel's (iopub, shell, control, stdin).
_RELAYED: defaultdict[tuple[str, str], Tally] = defaultdict(Tally)
#: Messages client sessions lost because they read too slowly or stayed away while their buffer filled.
DROPPED = Tally()


def relayed(channel: str, direction: str) -> Tally:
    """The tally of ``channel`` in ``direction`` (:data:`KERNEL_TO_CLIENT` or :data:`CLIENT_TO_KERNEL`)."""
    return _RELAYED[channel, direction]


# -- kernel store calls --------------------------------------------------------------------------------------
@contextmanager
def store_call(store: str, operation: str) -> Iterator[None]:
    """Time one kernel store call (``operation``: the engine method, e.g. ``_put``), counting it if it fails."""
    labels = (store, operation.lstrip("_"))
    started = time.perf_counter()
    try:
        yield
    except Exception:
        STORE_ERRORS.labels(*labels).inc()
        raise
    finally:
        STORE_SECONDS.labels(*labels).observe(time.perf_counter() - started)


# -- event-loop lag ------------------------------------------------------------------------------------------
class LoopLagMonitor:
    """A task that sleeps ``interval`` seconds and observes how much later than that it wakes up."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start sampling; called by the app once it serves."""
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            LOOP_LAG.observe(max(loop.time() - before - self.interval, 0.0))


# -- the scrape ------------------------------------------------------------------------------------------------
#: Label sets of the kernels gauge seen so far: reported as 0 once empty, so a query sees the count fall to 0
#: instead of the series vanishing.
_KERNEL_LABELS: set[tuple[str, str, str]] = set()


def _kernel_families(registry: Any) -> Iterator[Metric]:
    counts: dict[tuple[str, str, str], int] = dict.fromkeys(_KERNEL_LABELS, 0)
    connections = 0
    for kernel in (*registry.kernels.values(), *registry.starting.values()):
        key = (kernel.name, kernel_provisioner(kernel), kernel.execution_state)
        counts[key] = counts.get(key, 0) + 1
        connections += kernel.connections
    _KERNEL_LABELS.update(counts)
    kernels = GaugeMetricFamily("kernel_gateway_kernels", "Kernels held by this gateway, by kernelspec, provisioner "
                                "and execution state.", labels=["kernelspec", "provisioner", "state"])
    for key, count in sorted(counts.items()):
        kernels.add_metric(list(key), count)
    yield kernels
    yield GaugeMetricFamily("kernel_gateway_websocket_connections", "Kernel websocket connections open now.",
                            value=connections)
    sizes = GaugeMetricFamily("kernel_gateway_pool_size", "Warm kernels each pool keeps, by kernelspec.",
                              labels=["kernelspec"])
    warm = GaugeMetricFamily("kernel_gateway_pool_kernels", "Warm kernels in the pools now, by kernelspec and state "
                             "(ready, warming).", labels=["kernelspec", "state"])
    for pool in registry.pools.models():
        sizes.add_metric([pool["kernelspec"]], pool["size"])
        for state in ("ready", "warming"):
            warm.add_metric([pool["kernelspec"], state], pool[state])
    yield sizes
    yield warm


def _relay_families() -> Iterator[Metric]:
    messages = CounterMetricFamily("kernel_gateway_relayed_messages", "Kernel messages relayed by the websocket "
                                   "bridge, by channel and direction.", labels=["channel", "direction"])
    size = CounterMetricFamily("kernel_gateway_relayed_bytes", "Bytes (ZMQ frames) of the kernel messages relayed, "
                               "by channel and direction.", labels=["channel", "direction"])
    for (channel, direction), tally in sorted(_RELAYED.items()):
        messages.add_metric([channel, direction], tally.messages)
        size.add_metric([channel, direction], tally.bytes)
    yield messages
    yield size
    yield CounterMetricFamily("kernel_gateway_dropped_messages", "Messages client sessions lost because they read "
                              "too slowly or stayed away while the output buffer filled.", value=DROPPED.messages)


def _backend_families() -> Iterator[Metric]:
    rejections = CounterMetricFamily("kernel_gateway_handshake_rejections", "Launcher connections the response "
                                     "listener dropped, by reason.", labels=["reason"])
    listener = ResponseListener._instance
    for reason, count in sorted((listener.rejections if listener is not None else {}).items()):
        rejections.add_metric([reason.replace(" ", "_")], count)
    yield rejections
    requests = CounterMetricFamily("kernel_gateway_backend_api_requests", "Requests made to a backend's API "
                                   "(Kubernetes API server, YARN ResourceManager), by backend.", labels=["backend"])
    for backend, count in sorted(requests_by_backend().items()):
        requests.add_metric([backend], count)
    yield requests


class _Scrape:
    """One scrape: the registry's series (without prometheus_client's ``_created`` samples), then the computed ones."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
        info = GaugeMetricFamily("kernel_gateway_build_info", "Always 1; the gateway's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield from _kernel_families(self.registry)
        yield from _relay_families()
        yield from _backend_families()


def exposition(registry: Any) -> bytes:
    """Every series in the Prometheus text format; ``registry`` is the app's :class:`KernelRegistry`."""
    return generate_latest(_Scrape(registry))
