"""Kernel lifecycle: the registry of running kernels, their activity, and culling."""

from .culling import KernelCuller
from .registry import KernelRegistry, ManagedKernel

__all__ = ["KernelCuller", "KernelRegistry", "ManagedKernel"]
