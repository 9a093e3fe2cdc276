"""Warm starts for pools: what a provisioner offers so that its kernels can wait, started but unbound, for a request.

A warm kernel's launcher (or, for local kernels, its process) runs with the kernel's modules imported and no
kernel yet. When the gateway hands it out, ``KernelManager.start_kernel`` runs as for any kernel and the
provisioner's ``launch_kernel`` sends the request's environment to the waiting launcher instead of starting a
new one (late binding), so a pooled kernel is as much the requester's as a cold one. What the backend fixed
when it started the launcher (image, user, resources, host) cannot change then: a request that asks for any
of it (:attr:`WarmStartable.cold_start_envs`) starts cold.
"""

from __future__ import annotations

from typing import Any

from traitlets import Integer, TraitError, validate

from .envconfig import EnvConfigurable

__all__ = ["WarmStartable"]


class WarmStartable(EnvConfigurable):
    """A provisioner whose kernels can be started warm and handed out later (see the module docstring).

    Implementations define ``warm_up()`` (start the warm launcher or process; raise like ``launch_kernel``) and
    make their ``launch_kernel`` use the warm one when there is one; ``kill`` and ``cleanup`` end it.
    """

    pool_size = Integer(
        0,
        config=True,
        help="Kernels of this kernelspec the gateway keeps started and waiting (warm), so that a request gets one "
        "at once; set it per kernelspec in metadata.kernel_provisioner.config. 0: no pool.",
    ).tag(env="GATEWAY_POOL_SIZE")

    #: Request variables that decide what the backend starts; a request that sets one is not served warm.
    cold_start_envs: tuple[str, ...] = ()
    #: False where a warm start cannot work at all (spark-submit starts the launcher itself).
    supports_warm = True

    @validate("pool_size")
    def _pool_size_not_negative(self, proposal: dict) -> int:
        if proposal["value"] < 0:
            raise TraitError(f"pool_size must be 0 (no pool) or more, not {proposal['value']}")
        return proposal["value"]

    def warm_refusal(self, env: dict[str, str]) -> str:
        """Why a request with ``env`` cannot be served by a warm kernel of this provisioner; '' when it can."""
        fixed = sorted(name for name in self.cold_start_envs if env.get(name))
        return f"the request sets {', '.join(fixed)}" if fixed else ""

    async def warm_up(self, **kwargs: Any) -> None:
        """Start this kernel warm; called by the gateway's pool on a provisioner whose kernel was never started, with
        the keyword arguments the gateway gives ``start_kernel`` that do not depend on the request (``independent``)."""
        raise NotImplementedError

    def warm_ended(self) -> bool:
        """Whether the warm kernel's launcher or process has ended (it cannot be handed out). Must not block."""
        raise NotImplementedError

    async def discard_warm(self) -> None:
        """End the warm kernel without handing it out (its pool drains); must succeed if it is gone already."""
        raise NotImplementedError
