"""What runs beside a kernel: the launchers (plain scripts, copied into kernel images or onto hosts)."""

from pathlib import Path

#: The Python launcher script; run it with a Python that has ipykernel, pyzmq and cryptography.
PYTHON_LAUNCHER = Path(__file__).resolve().parent / "python" / "launch_ipykernel.py"

#: The line a warm local launcher writes on stderr once the kernel's modules are imported (see launch_ipykernel.py).
WARM_LOCAL_READY = "warm: modules imported, waiting for the start line on stdin"

__all__ = ["PYTHON_LAUNCHER", "WARM_LOCAL_READY"]
