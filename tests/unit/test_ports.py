"""Port range parsing and allocation."""

import socket

import pytest

from provisioners.errors import PortRangeError
from provisioners.ports import PortAllocator, PortRange, parse_port_range


@pytest.mark.parametrize("text", ["", "  "])
def test_empty_means_any(text):
    assert parse_port_range(text) is None


def test_parse_valid():
    assert parse_port_range("40000..40999") == PortRange(40000, 40999)


@pytest.mark.parametrize(
    "text, words",
    [
        ("abc", "low..high"),
        ("40000-40010", "low..high"),
        ("a..b", "whole numbers"),
        ("5..3000", "between 1024 and 65535"),
        ("40000..70000", "between 1024 and 65535"),
        ("40010..40000", "low end is above"),
        ("40000..40002", "needs at least 5"),
    ],
)
def test_parse_invalid_says_why(text, words):
    with pytest.raises(PortRangeError, match=words):
        parse_port_range(text)


def test_allocation_is_unique_and_inside_range():
    allocator = PortAllocator()
    rng = PortRange(47100, 47119)
    first = allocator.allocate(5, rng)
    second = allocator.allocate(5, rng)
    assert len(set(first) | set(second)) == 10
    assert all(p in rng for p in first + second)
    allocator.release(first)
    assert not set(first) & allocator.reserved


def _free_block(size: int) -> int:
    """The first port of ``size`` consecutive free ports below the ephemeral range (where nothing picks at random)."""
    for start in range(21000, 22000, size):
        if all(_free(p) for p in range(start, start + size)):
            return start
    pytest.skip("no free block of ports")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_allocation_skips_ports_in_use_and_reports_exhaustion():
    allocator = PortAllocator()
    port = _free_block(6)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        rng = PortRange(port, port + 5)
        got = allocator.allocate(5, rng)
        assert port not in got
        with pytest.raises(PortRangeError, match="fewer than 5 free ports"):
            allocator.allocate(5, rng)
