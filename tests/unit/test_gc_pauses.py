"""The collector pacing of a gateway with many kernels: survivors of a full collection are frozen (later
collections skip them), and let back every interval so that dead cycles among them are still collected."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

from kernel_gateway.gc_pauses import FullCollectionPacer


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_survivors_are_frozen_and_let_back_each_interval():
    pacer = FullCollectionPacer(interval=0.5)
    pacer.start()
    try:
        kept = [_Cycle() for _ in range(1000)]
        probe = weakref.ref(kept[0])
        gc.collect()  # a full collection: its survivors are frozen once the loop runs
        count = len(kept)
        await _until(lambda: gc.get_freeze_count() >= count)
        del kept  # dead cycles, frozen: no collection sees them until they are let back
        gc.collect(0)
        assert probe() is not None
        await _until(lambda: gc.get_freeze_count() == 0)  # the interval passed
        gc.collect()
        assert probe() is None
    finally:
        pacer.stop()
    assert gc.get_freeze_count() == 0 and pacer._collected not in gc.callbacks


async def test_zero_leaves_the_collector_alone():
    pacer = FullCollectionPacer(interval=0)
    pacer.start()
    gc.collect()
    await asyncio.sleep(0)
    assert gc.get_freeze_count() == 0 and pacer._collected not in gc.callbacks
    pacer.stop()
