"""Warm kernel pools: per kernelspec, kernels started ahead and waiting unbound, handed out to start requests.

A kernelspec whose provisioner has ``pool_size`` > 0 (see :mod:`provisioners.warm`) gets a pool. Each member is a
kernel manager whose provisioner ran ``warm_up()``: its launcher or process runs, the kernel's modules imported,
nothing bound, under a kernel id of its own. A start request the pool can serve takes a ready member (its id
becomes the kernel's) and the registry starts it as usual; the provisioner then hands the waiting launcher the
request's environment (late binding) instead of launching one. The pool refills in the background.

Members count toward the gateway's ``max_kernels`` (they hold processes, containers and pods) but toward no
user until handed out: a pool never fills past the limit, and a cold start that needs the room takes it from a
pool. Pools of a kernelspec that changed or went away drain; all drain when the gateway stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jupyter_client.kernelspec import NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from prometheus_client import Counter
from traitlets import Float, TraitError, validate

from provisioners.envconfig import EnvConfigurable
from provisioners.warm import WarmStartable

from .. import metrics

if TYPE_CHECKING:
    from .registry import KernelRegistry

__all__ = ["KernelPools", "WarmKernel"]

log = logging.getLogger("kernel_gateway.pools")

HITS = Counter("kernel_gateway_pool_hits", "Start requests served by a warm kernel, by kernelspec.", ["kernelspec"],
               registry=metrics.REGISTRY)
MISSES = Counter("kernel_gateway_pool_misses", "Start requests of a pooled kernelspec that started cold, by kernelspec "
                 "and reason (empty: no warm kernel ready; request: the request asked for what a warm kernel cannot "
                 "give).", ["kernelspec", "reason"], registry=metrics.REGISTRY)
#: Seconds a pool waits after a failed warm start, doubling up to the last value.
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0


@dataclass
class WarmKernel:
    """One pool member: its id (the kernel's once handed out) and its manager, whose provisioner holds the warm
    launcher or process."""

    kernel_id: str
    km: AsyncKernelManager
    ready: bool = False


@dataclass
class _Pool:
    name: str
    fingerprint: str
    size: int
    members: list[WarmKernel] = field(default_factory=list)
    failures: int = 0
    retry_at: float = 0.0  # monotonic time before which a pool that failed starts no member

    @property
    def ready(self) -> list[WarmKernel]:
        return [m for m in self.members if m.ready]


class KernelPools(EnvConfigurable):
    """The warm pools of every kernelspec that asks for one (see the module docstring)."""

    pool_check_interval = Float(
        10.0,
        config=True,
        help="Seconds between reads of the kernelspecs: pools of kernelspecs that changed or were removed drain, "
        "new pool sizes apply, and members that died are replaced.",
    ).tag(env="GATEWAY_POOL_CHECK_INTERVAL")

    @validate("pool_check_interval")
    def _positive_interval(self, proposal: dict[str, Any]) -> float:
        if not proposal["value"] > 0:
            raise TraitError(f"pool_check_interval must be more than 0 seconds, not {proposal['value']}")
        return proposal["value"]

    def __init__(self, registry: KernelRegistry, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.registry = registry
        self.pools: dict[str, _Pool] = {}
        self._sizes: dict[str, tuple[str, int]] = {}  # kernelspec -> (fingerprint, pool size) last read
        self._warming: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    # -- what the registry asks --------------------------------------------------------------------------------
    def holds(self, kernel_id: str) -> bool:
        """Whether ``kernel_id`` is a pool member (its container or pod is no leftover)."""
        return any(m.kernel_id == kernel_id for pool in self.pools.values() for m in pool.members)

    @property
    def count(self) -> int:
        """Members of every pool, warming or ready: they count toward ``max_kernels``."""
        return sum(len(pool.members) for pool in self.pools.values())

    def take(self, name: str, env: dict[str, str]) -> WarmKernel | None:
        """A ready member of ``name``'s pool for a request whose kernel environment is ``env``, or None (start cold)."""
        pool = self.pools.get(name)
        if pool is None:
            return None
        for member in pool.ready:
            if member.km.provisioner.warm_ended():
                continue  # died while waiting: the next check replaces it
            refusal = member.km.provisioner.warm_refusal(env)
            if refusal:
                log.info("kernelspec %s: starting cold: %s", name, refusal)
                MISSES.labels(name, "request").inc()
                return None
            pool.members.remove(member)
            HITS.labels(name).inc()
            return member  # refilled once the start is done (:meth:`refill`): a warm-up beside it would slow it
        MISSES.labels(name, "empty").inc()
        return None

    def refill(self) -> None:
        """Fill the pools up now; called by the registry when a start that took a warm kernel has ended."""
        self._wake.set()

    async def make_room(self) -> bool:
        """End one member (the newest, of the fullest pool) so that a cold start fits under ``max_kernels``;
        False when the pools hold none."""
        pools = [pool for pool in self.pools.values() if pool.members]
        if not pools:
            return False
        pool = max(pools, key=lambda p: len(p.members))
        member = pool.members.pop()
        await self._discard(member, "its room is needed for a cold start")
        return True

    # -- running -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Read the kernelspecs and keep the pools full; called by the registry once it serves."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Drain every pool; called by the registry when the gateway stops."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in list(self._warming):
            task.cancel()
        await asyncio.gather(*self._warming, return_exceptions=True)
        await asyncio.gather(*(self._drain(pool, "the gateway stops") for pool in list(self.pools.values())))
        self.pools.clear()

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # a pool's trouble must not end the pools: logged, tried again at the next check
                log.warning("pool check failed", exc_info=True)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.pool_check_interval)
            except asyncio.TimeoutError:
                pass

    async def check(self) -> None:
        """Follow the kernelspecs (drain changed or removed ones' pools), drop dead members, and refill."""
        specs = self._pool_specs(await asyncio.to_thread(self._read_specs))
        for name, pool in list(self.pools.items()):
            wanted = specs.get(name)
            if wanted is None or wanted[0] != pool.fingerprint:
                del self.pools[name]
                await self._drain(pool, "its kernelspec was removed" if name not in specs else "its kernelspec changed")
        for name, (fingerprint, size) in specs.items():
            pool = self.pools.setdefault(name, _Pool(name, fingerprint, size))
            pool.size = size
            for member in [m for m in pool.members if m.ready and m.km.provisioner.warm_ended()]:
                pool.members.remove(member)
                await self._discard(member, "it ended while waiting")
            while len(pool.members) > pool.size:
                await self._discard(pool.members.pop(), "the pool is smaller now")
            self._refill(pool)

    def _refill(self, pool: _Pool) -> None:
        total, _ = self.registry.count_for("")
        room = (self.registry.policy.max_kernels - total - self.count) if self.registry.policy.max_kernels else pool.size
        missing = min(pool.size - len(pool.members), room)
        if missing <= 0 or time.monotonic() < pool.retry_at or self.registry.stopping:
            return
        for _ in range(missing):
            kernel_id = str(uuid.uuid4())
            member = WarmKernel(kernel_id, self.registry.manager(kernel_id, pool.name))
            pool.members.append(member)
            task = asyncio.create_task(self._warm_up(pool, member))
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)

    async def _warm_up(self, pool: _Pool, member: WarmKernel) -> None:
        km = member.km
        started = time.monotonic()
        try:
            km.provisioner = KernelProvisionerFactory.instance(parent=km.parent).create_provisioner_instance(
                member.kernel_id, km.kernel_spec, parent=km)
            await asyncio.wait_for(km.provisioner.warm_up(independent=self.registry.on_stop == "keep"),
                                   self.registry.policy.launch_timeout)
        except Exception as exc:  # the backend refused or timed out: the pool backs off and tries again
            if member in pool.members:
                pool.members.remove(member)
            pool.failures += 1
            delay = min(BACKOFF_FIRST * 2 ** (pool.failures - 1), BACKOFF_MAX)
            pool.retry_at = time.monotonic() + delay
            log.warning("kernelspec %s: a warm kernel did not start (%s); trying again in %gs", pool.name,
                        str(exc) or type(exc).__name__, delay, extra={"kernel_id": member.kernel_id})
            await self._end(member)
            return
        if member not in pool.members:  # drained while it started
            await self._end(member)
            return
        pool.failures, member.ready = 0, True
        log.info("kernelspec %s: warm kernel ready in %.2fs", pool.name, time.monotonic() - started,
                 extra={"kernel_id": member.kernel_id})

    async def _drain(self, pool: _Pool, why: str) -> None:
        members, pool.members = pool.members, []
        if members:
            log.info("kernelspec %s: draining %d warm kernels: %s", pool.name, len(members), why)
        await asyncio.gather(*(self._end(m) for m in members if m.ready))

    async def _discard(self, member: WarmKernel, why: str) -> None:
        log.info("ending a warm kernel: %s", why, extra={"kernel_id": member.kernel_id})
        await self._end(member)

    @staticmethod
    async def _end(member: WarmKernel) -> None:
        provisioner = member.km.provisioner
        if provisioner is None:
            return
        try:
            await provisioner.discard_warm()
        except Exception:  # best effort: the backend's reaper removes what is left
            log.warning("a warm kernel did not end cleanly", exc_info=True, extra={"kernel_id": member.kernel_id})

    def _read_specs(self) -> dict[str, tuple[str, Any]]:
        """Every kernelspec: name -> (fingerprint, spec). Blocking: reads the kernelspec files."""
        manager = self.registry.kernel_spec_manager
        specs = {}
        for name in manager.find_kernel_specs():
            try:
                spec = manager.get_kernel_spec(name)
            except (NoSuchKernel, ValueError, OSError):
                continue
            specs[name] = (json.dumps([spec.resource_dir, spec.to_dict()], sort_keys=True, default=str), spec)
        return specs

    def _pool_specs(self, specs: dict[str, tuple[str, Any]]) -> dict[str, tuple[str, int]]:
        """The kernelspecs that want a pool: name -> (fingerprint, size); sizes are read again only when a
        kernelspec changed."""
        wanted = {}
        for name, (fingerprint, spec) in specs.items():
            cached = self._sizes.get(name)
            size = cached[1] if cached and cached[0] == fingerprint else self._pool_size(name, spec)
            self._sizes[name] = (fingerprint, size)
            if size:
                wanted[name] = (fingerprint, size)
        self._sizes = {name: self._sizes[name] for name in specs}
        return wanted

    def _pool_size(self, name: str, spec: Any) -> int:
        """``pool_size`` of the kernelspec's provisioner as configured (kernelspec config > config > env)."""
        try:  # configured as the start-up check configures it (startup_checks.validate_kernelspecs)
            provisioner = KernelProvisionerFactory.instance(parent=self.registry).create_provisioner_instance(
                "pool-size-probe", spec, parent=self.registry)
        except Exception as exc:  # its provisioner is missing or misconfigured: its starts say so; no pool
            log.warning("kernelspec %s: no pool (%s)", name, exc)
            return 0
        if not isinstance(provisioner, WarmStartable) or not provisioner.pool_size:
            return 0
        if not provisioner.supports_warm:
            log.warning("kernelspec %s asks for a pool of %d, but its provisioner cannot start kernels warm: no pool",
                        name, provisioner.pool_size)
            return 0
        return provisioner.pool_size

    def models(self) -> list[dict[str, Any]]:
        """Each pool's size and members, for the dashboard and /metrics."""
        return [{"kernelspec": pool.name, "size": pool.size, "ready": len(pool.ready),
                 "warming": len(pool.members) - len(pool.ready)} for pool in sorted(self.pools.values(), key=lambda p: p.name)]
