"""One bounded thread pool for the blocking client libraries (paramiko, docker, kubernetes, yarn)."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

__all__ = ["run_blocking"]

T = TypeVar("T")
MAX_WORKERS = 16
_executor: ThreadPoolExecutor | None = None


async def run_blocking(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``func`` in the shared pool so the event loop never waits on a blocking library."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="provisioner-io")
    return await asyncio.get_running_loop().run_in_executor(_executor, functools.partial(func, *args, **kwargs))
