"""The store contract every engine implements; sealing and the one-writer rule are done here, once."""

from __future__ import annotations

import asyncio
import functools
import logging
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from .. import metrics
from .crypto import RecordCipher, TamperedRecord
from .record import KernelRecord

__all__ = ["KernelStore", "StoreUnavailable"]

log = logging.getLogger("kernel_gateway.store")
T = TypeVar("T")


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or used right now; the message says which store and why."""


class KernelStore(ABC):
    """Sealed kernel records by kernel id. Engines implement the blocking ``_put/_get/_delete/_all`` on raw
    blobs; this class seals and opens records and runs every call on the store's own single thread, so the
    event loop never waits on the engine and writes never interleave."""

    name = "store"
    shared = False  # whether several gateways (replicas) may use it at once

    def __init__(self, cipher: RecordCipher) -> None:
        self._cipher = cipher
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kernel-store-{self.name}")

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        with metrics.store_call(self.name, func.__name__):
            try:
                return await asyncio.get_running_loop().run_in_executor(self._thread, functools.partial(func, *args))
            except StoreUnavailable:
                raise
            except Exception as exc:  # the engine's own errors (connection refused, disk full, locked file)
                raise StoreUnavailable(f"kernel store ({self.describe()}): {type(exc).__name__}: {exc}") from None

    async def put(self, record: KernelRecord) -> None:
        """Write (or replace) ``record``; returns once the engine has it durably."""
        await self._run(self._put, record.kernel_id, self._cipher.seal(record))

    async def get(self, kernel_id: str) -> KernelRecord | None:
        """The record of ``kernel_id``; None if there is none. :class:`TamperedRecord` if it fails to open."""
        blob = await self._run(self._get, kernel_id)
        return None if blob is None else self._cipher.open(kernel_id, blob)

    async def remove(self, kernel_id: str) -> None:
        await self._run(self._delete, kernel_id)

    async def records(self) -> list[KernelRecord]:
        """Every record that opens; a tampered one is logged (once per call) and left out, never trusted."""
        found = []
        for kernel_id, blob in await self._run(self._all):
            try:
                found.append(self._cipher.open(kernel_id, blob))
            except (TamperedRecord, ValueError) as exc:
                log.warning("kernel store (%s): refusing the record of kernel %s: %s", self.describe(), kernel_id, exc)
        return found

    async def close(self) -> None:
        await self._run(self._close)
        self._thread.shutdown(wait=False)

    # -- what replicas share besides records ---------------------------------------------------------
    async def note_activity(self, activity: dict[str, float]) -> None:
        """Record when kernels were last active (unix time), in one write for the whole batch; a kernel keeps the
        latest time any replica reported. Kernels without a record are ignored."""
        if activity:
            await self._run(self._note_activity, dict(activity))

    async def activity(self) -> dict[str, float]:
        """The latest activity replicas recorded, by kernel id."""
        return await self._run(self._activity)

    async def take_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Take, or renew, the lease ``name`` for ``holder`` for ``seconds``; False while another holder's runs."""
        return await self._run(self._take_lease, name, holder, seconds)

    # -- what an engine implements (blocking; called on the store's thread) -------------------------
    @abstractmethod
    def describe(self) -> str:
        """Where the records are, for messages (no credentials)."""

    @abstractmethod
    def _put(self, kernel_id: str, blob: bytes) -> None: ...

    @abstractmethod
    def _get(self, kernel_id: str) -> bytes | None: ...

    @abstractmethod
    def _delete(self, kernel_id: str) -> None: ...

    @abstractmethod
    def _all(self) -> list[tuple[str, bytes]]: ...

    def _close(self) -> None:
        """Release the engine's connection; default: nothing."""

    # a store one gateway uses alone (not ``shared``): the activity it sees is all there is, and the lease is its own
    def _note_activity(self, activity: dict[str, float]) -> None:
        """Default: nothing to share."""

    def _activity(self) -> dict[str, float]:
        return {}

    def _take_lease(self, name: str, holder: str, seconds: float) -> bool:
        return True
