"""Replicas sharing one kernel store: this gateway's view of the kernels its peers started.

With a shared store (PostgreSQL, Kubernetes) any replica serves any kernel. A replica knows the kernels it
does not hold from their records (``peers``), read in one query every ``replica_sync_interval``, and takes one
over when a request or websocket names it (:meth:`ReplicaView.find`), by the same re-attach as after a restart.
The same read lets go of held kernels a peer shut down, and follows those a peer restarted or took over as
their keeper (their record changed). Each sync also writes, in one batch, when this replica last saw each of its
kernels active, for the one replica that culls (it holds the store's ``culler`` lease).

Each kernel has a keeper (in its record): the replica that started it, or restarted it last, which restarts it
when it dies. Every replica renews a lease saying it is alive at each sync; a kernel whose keeper's lease has run
out (killed, or stopped) is taken over by one of the others (claimed with a lease of its own), which becomes its
keeper, or cleans it up when it died meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

from ..errors import NotReadyError
from ..store import KernelRecord, StoreUnavailable
from .managed import ManagedKernel, iso_utc

if TYPE_CHECKING:
    from .registry import KernelRegistry

__all__ = ["ReplicaView", "peer_model"]

log = logging.getLogger("kernel_gateway.kernels")

#: Seconds a restart marked in a record keeps others from taking the kernel for dead.
RESTART_GRACE = 600.0


def peer_model(record: KernelRecord) -> dict[str, Any]:
    """The model of a kernel another replica holds, from its record (its state is not known here)."""
    return {"id": record.kernel_id, "name": record.kernel_name, "last_activity": iso_utc(record.created),
            "execution_state": "idle", "connections": 0}


class ReplicaView:
    """The kernels of the shared store that this replica does not hold, and taking them over on demand."""

    def __init__(self, registry: KernelRegistry, interval: float) -> None:
        self.registry = registry
        self.interval = interval
        self.peers: dict[str, KernelRecord] = {}
        #: this replica in the store's leases (unique per process)
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._adopting: dict[str, asyncio.Future] = {}
        self._noted: dict[str, float] = {}  # the activity this replica has written, by kernel id
        self._task: asyncio.Task | None = None
        self.alive_seconds = 3 * interval + 2  # how long this replica counts as alive after a sync

    @staticmethod
    def _alive_lease(replica_id: str) -> str:
        return f"replica:{replica_id}"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def leave(self) -> None:
        """Give up this replica's alive lease at once, so others take over the kernels it keeps without waiting."""
        try:
            await self.registry.store.take_lease(self._alive_lease(self.replica_id), self.replica_id, 0)
        except StoreUnavailable as exc:
            log.warning("could not tell the other replicas that this one stops (they notice in %gs): %s",
                        self.alive_seconds, exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sync()
            except StoreUnavailable as exc:  # the held kernels are served on; the view is refreshed when it is back
                log.warning("cannot read the kernel store to see other replicas' kernels: %s", exc)

    async def sync(self) -> None:
        """Read every record once: learn the peers' kernels, follow what peers did to the kernels held here."""
        store = self.registry.store
        await store.take_lease(self._alive_lease(self.replica_id), self.replica_id, self.alive_seconds)
        read_at = time.monotonic()
        records = {r.kernel_id: r for r in await store.records()}
        registry = self.registry
        for kernel_id, kernel in list(registry.kernels.items()):
            if kernel.held_since > read_at or kernel.lock.locked():
                continue  # taken or changed here after the read: the read does not know it yet
            record = records.get(kernel_id)
            if record is None:
                registry.release(kernel, "another replica shut it down")
            elif kernel.record is not None and record != kernel.record:
                await registry.follow(kernel, record)
        self.peers = {kid: r for kid, r in records.items() if kid not in registry.kernels and kid not in registry.starting}
        await self._note_activity()
        await self._keep_orphans()

    async def _keep_orphans(self) -> None:
        """Become the keeper of the kernels whose keeper is gone (one replica claims each): those this replica
        does not hold are taken over (or cleaned up if they died), those it serves for another become its own."""
        store, registry, alive = self.registry.store, self.registry, {self.replica_id: True}
        served = [k.record for k in registry.kernels.values() if not k.owned and k.record is not None]
        for record in [*self.peers.values(), *served]:
            if record.restarting_since and time.time() - record.restarting_since < RESTART_GRACE:
                continue
            keeper = record.keeper
            if keeper and keeper not in alive:  # a lease of one that has run out can be taken: then it is gone
                alive[keeper] = not await store.take_lease(self._alive_lease(keeper), self.replica_id, 0)
            if alive.get(keeper, False) or not await store.take_lease(f"keep:{record.kernel_id}", self.replica_id,
                                                                      self.alive_seconds):
                continue
            log.info("kernel %s: its keeper %s is gone; this replica keeps it now", record.kernel_id, keeper or "(none)",
                     extra={"kernel_id": record.kernel_id})
            kernel = registry.kernels.get(record.kernel_id)
            if kernel is None and await registry.reattach(record):
                kernel = registry.kernels[record.kernel_id]
            self.peers.pop(record.kernel_id, None)  # only now: listed as a peer until it is held (or cleaned)
            if kernel is not None:
                registry.make_keeper(kernel)
                await registry.update_record(kernel)

    async def _note_activity(self) -> None:
        """Write when this replica's kernels were last active (a busy one: now), those that changed, in one batch."""
        now = time.time()
        seen = {kid: now if k.execution_state == "busy" else k.last_activity for kid, k in self.registry.kernels.items()}
        batch = {kid: t for kid, t in seen.items() if t > self._noted.get(kid, 0.0)}
        await self.registry.store.note_activity(batch)
        self._noted = {kid: max(t, self._noted.get(kid, 0.0)) for kid, t in seen.items()}

    async def find(self, kernel_id: str) -> ManagedKernel | None:
        """The kernel, taken over from its record if another replica started it; None if the store has none."""
        pending = self._adopting.get(kernel_id)
        if pending is None:
            pending = asyncio.ensure_future(self._take_over(kernel_id))
            self._adopting[kernel_id] = pending
            pending.add_done_callback(lambda _: self._adopting.pop(kernel_id, None))
        return await asyncio.shield(pending)

    async def _take_over(self, kernel_id: str) -> ManagedKernel | None:
        try:
            record = await self.registry.store.get(kernel_id)
        except StoreUnavailable as exc:
            raise NotReadyError(f"kernel {kernel_id} is held by another replica and the kernel store cannot be read: "
                                f"{exc}", kernel_id=kernel_id) from None
        if record is None:
            self.peers.pop(kernel_id, None)
            return None
        if kernel_id not in self.registry.kernels:
            await self.registry.reattach(record, owned=False)
        self.peers.pop(kernel_id, None)
        return self.registry.kernels.get(kernel_id)
