"""A standalone Jupyter kernel gateway: the kernel REST and websocket API over kernels that run anywhere."""

__version__ = "0.1.0"

__all__ = ["__version__"]
