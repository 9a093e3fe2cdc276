"""Port ranges: parsing, validation and allocation, so no two kernels are handed one port.

A range is written ``"lo..hi"`` (inclusive); an empty string means "any free port". The
allocator is one per process: every provisioner in the process draws from it, so concurrent
starts cannot be given the same port, and a port stays reserved until its kernel is gone.
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass

from traitlets import TraitError, Unicode

from .errors import PortRangeError

__all__ = ["PortAllocator", "PortRange", "PortRangeOption", "default_port_range", "parse_port_range"]

#: A kernel needs five ports (shell, iopub, stdin, control, heartbeat).
KERNEL_PORT_COUNT = 5


@dataclass(frozen=True)
class PortRange:
    """An inclusive range of TCP ports."""

    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    @property
    def size(self) -> int:
        return self.high - self.low + 1

    def __str__(self) -> str:
        return f"{self.low}..{self.high}"


def parse_port_range(text: str, *, minimum_size: int = KERNEL_PORT_COUNT) -> PortRange | None:
    """Parse ``"lo..hi"``; return None for an empty value or ``0..0``; raise :class:`PortRangeError` naming the problem."""
    text = (text or "").strip()
    if not text or text == "0..0":  # Enterprise Gateway's way of saying "no range"
        return None
    low_text, sep, high_text = text.partition("..")
    if not sep:
        raise PortRangeError(f"port range {text!r} must be written 'low..high', for example '40000..40999'")
    try:
        low, high = int(low_text), int(high_text)
    except ValueError:
        raise PortRangeError(f"port range {text!r}: both ends must be whole numbers") from None
    if not 1024 <= low <= 65535 or not 1024 <= high <= 65535:
        raise PortRangeError(f"port range {text!r}: ports must lie between 1024 and 65535")
    if low > high:
        raise PortRangeError(f"port range {text!r}: the low end is above the high end")
    if high - low + 1 < minimum_size:
        raise PortRangeError(
            f"port range {text!r} has {high - low + 1} ports; a kernel needs at least {minimum_size}"
        )
    return PortRange(low, high)


class PortRangeOption(Unicode):
    """A ``"low..high"`` option; a malformed range is a :class:`TraitError` naming the problem."""

    def validate(self, obj, value):  # type: ignore[override]
        value = super().validate(obj, value).strip()
        try:
            parse_port_range(value)
        except PortRangeError as exc:
            raise TraitError(str(exc)) from exc
        return value


def default_port_range() -> PortRange:
    """Where kernel ports come from when no range is configured: the 10,000 ports just below the OS's
    ephemeral range, so neither the OS nor a kernel picking a port at random can take one already handed out."""
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return PortRange(max(1024, low - 10_000), max(1024 + KERNEL_PORT_COUNT, low - 1))


def _is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class PortAllocator:
    """Hands out ports inside a range and remembers them until released.

    One instance per process (:meth:`instance`); ports reserved here are never handed out twice,
    and each is checked free on ``host`` before it is given.
    """

    _instance: PortAllocator | None = None

    def __init__(self) -> None:
        self._reserved: set[int] = set()

    @classmethod
    def instance(cls) -> PortAllocator:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    @property
    def reserved(self) -> frozenset[int]:
        return frozenset(self._reserved)

    def allocate(self, count: int, port_range: PortRange, host: str = "127.0.0.1") -> list[int]:
        """Reserve ``count`` free ports inside ``port_range``; raise :class:`PortRangeError` if too few remain."""
        chosen: list[int] = []
        start = random.randrange(port_range.size)
        for offset in range(port_range.size):
            port = port_range.low + (start + offset) % port_range.size
            if port in self._reserved or not _is_free(host, port):
                continue
            chosen.append(port)
            if len(chosen) == count:
                self._reserved.update(chosen)
                return chosen
        raise PortRangeError(
            f"port range {port_range} has fewer than {count} free ports "
            f"({len(self._reserved & set(range(port_range.low, port_range.high + 1)))} held by running kernels)"
        )

    def reserve(self, port: int) -> None:
        """Mark a port bound by someone in this process (e.g. the response listener) as taken."""
        self._reserved.add(port)

    def release(self, ports: list[int] | tuple[int, ...]) -> None:
        """Give ports back; unknown ports are ignored."""
        self._reserved.difference_update(ports)
