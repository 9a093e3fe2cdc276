"""``python -m kernel_gateway``."""

from .app import main

main()
