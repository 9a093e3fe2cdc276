"""Kernels the gateway keeps elsewhere than in a provisioner's own state: the reapers of leftovers spare them.

A gateway with a kernel store knows kernels its provisioners do not track yet: those another replica started
(same instance name, so the same labels), or those about to be re-attached. The gateway tells the provisioners
with :func:`set_kept`; each reaper asks :func:`is_kept` before removing a container, pod or application.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["is_kept", "set_kept"]

_kept: Callable[[str], bool] = lambda kernel_id: False


def set_kept(predicate: Callable[[str], bool]) -> None:
    """Install the gateway's answer to "is kernel <id> one of ours?" (called from any thread)."""
    global _kept
    _kept = predicate


def is_kept(kernel_id: str) -> bool:
    return bool(kernel_id) and _kept(kernel_id)
