"""Kernels the gateway keeps elsewhere than in a provisioner's own state: the reapers of leftovers spare them.

A gateway with a kernel store knows kernels its provisioners do not track yet: those another replica started
(same instance name, so the same labels), or those about to be re-attached. The gateway tells the provisioners
with :func:`set_kept`; each reaper asks :func:`is_kept` before removing a container, pod or application.

Replicas also launch kernels whose records are not written yet (a record follows a successful start), so with
replicas an object younger than ``min_age`` seconds (the longest launch, and a margin) is never a leftover.
"""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["is_kept", "set_kept"]

_kept: Callable[[str], bool] = lambda kernel_id: False
_min_age = 0.0


def set_kept(predicate: Callable[[str], bool], min_age: float = 0.0) -> None:
    """Install the gateway's answer to "is kernel <id> one of ours?" (called from any thread), and how old an
    object must be to count as a leftover."""
    global _kept, _min_age
    _kept, _min_age = predicate, min_age


def is_kept(kernel_id: str, created: float | None = None) -> bool:
    """Whether the object of ``kernel_id``, created at unix time ``created`` (None: not known), must be spared."""
    if kernel_id and _kept(kernel_id):
        return True
    return _min_age > 0 and (created is None or time.time() - created < _min_age)
