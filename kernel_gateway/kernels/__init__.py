"""Kernel lifecycle: the registry of running kernels, their activity, culling, and warm pools."""

from .culling import KernelCuller
from .managed import ManagedKernel
from .pools import KernelPools
from .registry import KernelRegistry

__all__ = ["KernelCuller", "KernelPools", "KernelRegistry", "ManagedKernel"]
