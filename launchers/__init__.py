"""What runs beside a kernel: the launchers (plain scripts, copied into kernel images or onto hosts)."""

from pathlib import Path

#: The Python launcher script; run it with a Python that has ipykernel, pyzmq and cryptography.
PYTHON_LAUNCHER = Path(__file__).resolve().parent / "python" / "launch_ipykernel.py"

__all__ = ["PYTHON_LAUNCHER"]
