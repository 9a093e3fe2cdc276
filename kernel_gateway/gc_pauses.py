"""Short garbage-collection pauses for a gateway that holds many kernels.

CPython's collector stops everything while it scans a generation, and a full (generation 2) collection scans
every object the process holds. With 1,000 kernels that is millions of objects (managers, bridges, sockets,
buffers) and 120–300 ms with the event loop stopped, every few seconds while kernels stream output: every
request and message waits. Almost all of those objects live as long as their kernel, so after a full collection
:class:`FullCollectionPacer` moves the survivors out of the collector's sight (``gc.freeze()``); later
collections scan only what came after. Every ``interval`` seconds it lets them back (``gc.unfreeze()``), so
that reference cycles among them that died meanwhile are still collected, at one long pause per interval.
Reference counting frees everything else at once, as always.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

__all__ = ["FullCollectionPacer"]


class FullCollectionPacer:
    """Freezes the survivors of each full collection and unfreezes them every ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start pacing (called by the app once it serves); nothing when ``interval`` is 0."""
        if not self.interval:
            return
        self._loop = asyncio.get_running_loop()
        gc.callbacks.append(self._collected)
        self._timer = self._loop.call_later(self.interval, self._unfreeze)

    def stop(self) -> None:
        if self._loop is None:
            return
        gc.callbacks.remove(self._collected)
        if self._timer is not None:
            self._timer.cancel()
        gc.unfreeze()
        self._loop = None

    def _collected(self, phase: str, info: dict[str, Any]) -> None:
        # may run in any thread, inside an allocation: only hand the loop a call
        if phase == "stop" and info["generation"] == 2 and self._loop is not None:
            self._loop.call_soon_threadsafe(self._freeze)

    def _freeze(self) -> None:
        if self._loop is not None:  # not stopped meanwhile
            gc.freeze()

    def _unfreeze(self) -> None:
        gc.unfreeze()  # the next full collection scans everything once, and freezes what survives it
        self._timer = self._loop.call_later(self.interval, self._unfreeze) if self._loop is not None else None
