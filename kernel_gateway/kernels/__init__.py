"""Kernel lifecycle: the registry of running kernels, their activity, and culling."""

from .culling import KernelCuller
from .managed import ManagedKernel
from .registry import KernelRegistry

__all__ = ["KernelCuller", "KernelRegistry", "ManagedKernel"]
