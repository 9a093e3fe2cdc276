"""Linux /proc helpers: resident set size, CPU time and process trees (no psutil needed)."""

from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    return data[data.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (0 if gone)."""
    fields = _stat_fields(pid)
    if not fields:
        return 0.0
    # after ')': state(0) ppid(1) ... utime(11) stime(12)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(name))
    return children


def descendants(pid: int) -> list[int]:
    """All live descendant pids of ``pid``."""
    children = _ppid_map()
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), ()):
            out.append(child)
            stack.append(child)
    return out


def tree_rss_kb(pid: int) -> tuple[int, int, int]:
    """(rss of pid, summed rss of its descendants, number of descendants), KiB."""
    kids = descendants(pid)
    return rss_kb(pid) or 0, sum(rss_kb(k) or 0 for k in kids), len(kids)


def tree_cpu(pid: int) -> tuple[float, float]:
    """(cpu seconds of pid, summed cpu seconds of its live descendants)."""
    return cpu_seconds(pid), sum(cpu_seconds(k) for k in descendants(pid))
