#!/usr/bin/env python
"""1,000 live kernels on one gateway: what holding them costs while they idle and while 100 of them stream.

    python benchmarks/bench_thousand_kernels.py [--kernels 1000] [--window 60] [--json out.json]
    python benchmarks/bench_thousand_kernels.py --kernels 200 --window 20     # quick check (~3 min)

Starts everything itself on loopback and removes it on exit, also after a failure, Ctrl-C or SIGTERM:

* the load-test kernel (``benchmarks/loadtest_kernel``: pyzmq only, ~16 MB resident) installed as kernelspec
  ``loadtest`` in a temp ``JUPYTER_PATH``, started by the gateway's ordinary local provisioner
  (``local-port-range-provisioner``), which runs its argv as is;
* our gateway (``bench_gateway.Gateway``: ``python -m kernel_gateway`` on a free port, ``--gateway-root`` on
  ``PYTHONPATH``, default this checkout), with ``GATEWAY_PORT_RANGE`` ``--port-range`` (6 ports a kernel), no
  kernel limit, culling off, and the open-file limit raised to the hard limit in this process (inherited).

Phases, each measured over ``--window`` seconds (``--baseline-window`` for the baseline):

1. baseline: ``--baseline`` 10 kernels idle, then all of them streaming to one websocket client each;
2. ``--kernels`` kernels (started ``--concurrency`` 20 at a time): idle, then ``--streams`` 100 of them streaming
   (``stream N every S``: one stream message every ``--stream-every`` s each) to 100 websocket clients (v1).

Figures per window: the gateway's event-loop lag (``kernel_gateway_event_loop_lag_seconds`` from ``/metrics``,
the histogram's change over the window: p99 as the upper bound of its bucket, and the mean), ``GET /api/kernels``
latency (``--list-requests`` 50, evenly spread, from a thread on its own keep-alive connection), the gateway's RSS,
CPU %, open fds and threads (/proc, the gateway process alone), the kernels' summed RSS and PSS and CPU, and, with
``strace`` present, the kernel process polls the gateway makes (``wait4`` calls in ``--poll-window`` seconds,
strace attached after the window so that it does not disturb the other figures). Every kernel is deleted at the
end and no kernel process may be left. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import _procstat as ps  # noqa: E402
from _wsclient import KernelWebSocket  # noqa: E402
from bench_gateway import OURS_CMD, Gateway, end_run, guarded, log, pct, run_meta, table  # noqa: E402
from bench_store import sweep  # noqa: E402
from bench_yarn import _sigterm  # noqa: E402  (SIGTERM raises KeyboardInterrupt: the same cleanup as Ctrl-C)

perf = time.perf_counter
KERNEL_DIR = HERE / "loadtest_kernel"
SPEC = "loadtest"
#: The goals of issue 11 ("1,000 kernels on one gateway").
GOAL_LAG_P99_S = 0.050
GOAL_LIST_S = 0.100
GOAL_RSS_MB = 500
#: jupyter_client's KernelRestarter polls each kernel every time_to_dead seconds (default 3).
POLL_INTERVAL_S = 3.0
_LIST_LOGGED = re.compile(r"kernel_gateway\.access\] 200 GET /api/kernels ([0-9.]+)ms$", re.M)
_LAG = re.compile(r'^kernel_gateway_event_loop_lag_seconds_(bucket\{le="([^"]+)"\}|sum|count) ([0-9.e+-]+)$', re.M)


# -------------------------------------------------------------------------------------------------------------------
# measurements from outside the gateway
# -------------------------------------------------------------------------------------------------------------------
def proc_field(pid: int, name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def runqueue_wait_s(pid: int) -> float:
    """Seconds the process's main thread (the gateway's event loop) has spent runnable but waiting for a CPU."""
    try:
        return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def lag_histogram(gw: Gateway) -> dict[str, float]:
    """The loop-lag histogram as /metrics shows it now: {le: cumulative count, 'sum': s, 'count': n}."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
    try:
        conn.request("GET", "/metrics", headers=gw.headers)
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    out: dict[str, float] = {}
    for kind, le, value in _LAG.findall(body):
        out[le or kind] = float(value)
    return out


def lag_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """p99 (upper bound of its bucket), mean and max bucket of the lag samples taken between two scrapes."""
    count = after.get("count", 0) - before.get("count", 0)
    if count <= 0:
        return {"samples": 0}
    bounds = sorted((float(le), after[le] - before.get(le, 0)) for le in after if le not in ("sum", "count"))
    p99 = worst = None
    for bound, cumulative in bounds:
        if p99 is None and cumulative >= 0.99 * count:
            p99 = bound
        if worst is None and cumulative >= count:
            worst = bound
    return {"samples": int(count), "p99_le_s": p99, "max_le_s": worst,
            "mean_s": (after["sum"] - before.get("sum", 0)) / count}


class ListProbe(threading.Thread):
    """``GET /api/kernels`` ``n`` times, evenly over ``seconds``, on one keep-alive connection of its own (a thread,
    so that the websocket clients on the event loop do not delay it)."""

    def __init__(self, gw: Gateway, n: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.gw, self.n, self.seconds = gw, n, seconds
        self.times: list[float] = []
        self.counts: list[int] = []
        self.errors: list[str] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=60)
        start = perf()
        try:
            for i in range(self.n):
                delay = start + i * self.seconds / self.n - perf()
                if delay > 0:
                    time.sleep(delay)  # pacing, not synchronisation
                t0 = perf()
                try:
                    conn.request("GET", "/api/kernels", headers=self.gw.headers)
                    resp = conn.getresponse()
                    body = resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    self.errors.append(repr(exc))
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=60)
                    continue
                self.times.append(perf() - t0)
                if resp.status == 200:
                    self.counts.append(len(json.loads(body)))
                else:
                    self.errors.append(f"HTTP {resp.status}")
        finally:
            conn.close()


def count_polls(pid: int, seconds: float) -> dict[str, Any] | None:
    """wait4/waitid calls of every gateway thread in ``seconds`` (strace -c): one per kernel poll of the local
    provisioner (``Popen.poll``). None when strace is not installed or may not attach."""
    if not shutil.which("strace"):
        return None
    try:
        out = subprocess.run(["timeout", "-s", "INT", str(seconds), "strace", "-f", "-c", "-e", "trace=wait4,waitid",
                              "-p", str(pid)], capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        return None
    calls = 0
    for line in out.stderr.splitlines():
        fields = line.split()
        if fields and fields[-1] in ("wait4", "waitid"):
            calls += int(fields[3] if len(fields) >= 5 and fields[3].isdigit() else fields[-2])
    if "attach" in out.stderr and "Operation not permitted" in out.stderr:
        return None
    return {"seconds": seconds, "calls": calls, "per_poll_interval": calls * POLL_INTERVAL_S / seconds}


class Kernels:
    """The gateway's kernel processes (its descendants), summed."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def pids(self) -> list[int]:
        return ps.descendants(self.gw.proc.pid)

    def snapshot(self) -> dict[str, Any]:
        pids = self.pids()
        return {"processes": len(pids), "rss_mb": sum(ps.rss_kb(p) or 0 for p in pids) / 1024,
                "pss_mb": sum(pss_kb(p) for p in pids) / 1024}

    def cpu(self) -> float:
        return sum(ps.cpu_seconds(p) for p in self.pids())

    def renice(self, value: int) -> None:
        """Set every thread of every kernel to nice ``value``: a kernel inherits the nice value of the gateway thread
        that started it, and Linux sets it per thread."""
        for pid in self.pids():
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, value)
                except OSError:
                    pass


# -------------------------------------------------------------------------------------------------------------------
# phases
# -------------------------------------------------------------------------------------------------------------------
async def start_kernels(gw: Gateway, count: int, concurrency: int, timeout: float) -> dict[str, Any]:
    """POST /api/kernels ``count`` times, ``concurrency`` at once; the ids land in ``gw.kernel_ids``."""
    sem = asyncio.Semaphore(concurrency)
    times: list[float] = []
    errors: list[str] = []

    async def one() -> None:
        async with sem:
            t0 = perf()
            try:
                r = await gw.fetch("POST", "/api/kernels", {"name": SPEC}, timeout)
            except Exception as exc:
                errors.append(repr(exc))
                return
            if r.code in (200, 201):
                gw.kernel_ids.add(json.loads(r.body)["id"])
                times.append(perf() - t0)
            else:
                errors.append(f"{r.code} {r.body[:200]!r}")
            if len(times) % 100 == 0 and times:
                log(f"  {len(gw.kernel_ids)} kernels")

    t0 = perf()
    await asyncio.gather(*(one() for _ in range(count)))
    wall = perf() - t0
    return {"started": len(times), "failed": len(errors), "errors": errors[:5], "wall_s": wall,
            "per_s": len(times) / wall if wall else None, "post_median_s": statistics.median(times) if times else None,
            "post_p99_s": pct(times, 99)}


async def delete_kernels(gw: Gateway, concurrency: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)

    async def one(kid: str) -> int:
        async with sem:
            return await gw.delete_kernel(kid, 120)

    t0 = perf()
    codes = await asyncio.gather(*(one(k) for k in list(gw.kernel_ids)), return_exceptions=True)
    return {"deleted": sum(1 for c in codes if c in (200, 204)), "failed": sum(1 for c in codes if c not in (200, 204)),
            "wall_s": perf() - t0}


async def window(gw: Gateway, kernels: Kernels, seconds: float, args: argparse.Namespace,
                 streams: list[tuple[str, KernelWebSocket, Any]] | None = None) -> dict[str, Any]:
    """The figures of one window, all taken from outside the gateway."""
    pid = gw.proc.pid
    lag0 = await asyncio.to_thread(lag_histogram, gw)
    cpu0, kcpu0, wait0, t0 = ps.cpu_seconds(pid), kernels.cpu(), runqueue_wait_s(pid), perf()
    client0 = time.process_time()
    log_offset = gw.log_path.stat().st_size
    recv0 = sum(ws.received for _, ws, _ in streams or ())
    probe = ListProbe(gw, args.list_requests, seconds)
    probe.start()
    await asyncio.sleep(seconds)  # the window itself: nothing to wait for, the probe and the streams run
    await asyncio.to_thread(probe.join, 120)
    elapsed = perf() - t0
    cpu1, kcpu1, wait1 = ps.cpu_seconds(pid), kernels.cpu(), runqueue_wait_s(pid)
    client_cpu = time.process_time() - client0
    with open(gw.log_path, "rb") as f:  # the gateway's own time for each request (its access log), no client side
        f.seek(log_offset)
        served = [float(ms) for ms in _LIST_LOGGED.findall(f.read().decode(errors="replace"))]
    recv1 = sum(ws.received for _, ws, _ in streams or ())
    lag1 = await asyncio.to_thread(lag_histogram, gw)
    out: dict[str, Any] = {
        "seconds": elapsed,
        "lag": lag_figures(lag0, lag1),
        "list": {"n": len(probe.times), "median_ms": statistics.median(probe.times) * 1000 if probe.times else None,
                 "p99_ms": pct(probe.times, 99) * 1000 if probe.times else None,
                 "max_ms": max(probe.times) * 1000 if probe.times else None,
                 "served_median_ms": statistics.median(served) if served else None,
                 "served_p99_ms": pct(served, 99) if served else None,
                 "kernels_listed": max(probe.counts) if probe.counts else None, "errors": probe.errors[:3]},
        "gateway": {"rss_mb": (ps.rss_kb(pid) or 0) / 1024, "cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
                    "runqueue_wait_pct": 100 * (wait1 - wait0) / elapsed,
                    "fds": open_fds(pid), "threads": proc_field(pid, "Threads")},
        "kernels": {**await asyncio.to_thread(kernels.snapshot), "cpu_pct": 100 * (kcpu1 - kcpu0) / elapsed},
        "client_cpu_pct": 100 * client_cpu / elapsed,
        "loadavg": os.getloadavg()[0],
    }
    if streams is not None:
        out["streams"] = {"clients": len(streams), "msgs_per_s": (recv1 - recv0) / elapsed,
                          "gateway_cpu_ms_per_1k_msgs": 1e6 * (cpu1 - cpu0) / max(recv1 - recv0, 1)}
    if args.poll_window > 0:
        out["polls"] = await asyncio.to_thread(count_polls, pid, args.poll_window)
    return out


async def open_streams(gw: Gateway, kernel_ids: list[str], args: argparse.Namespace,
                       failures: list[str]) -> list[tuple[str, KernelWebSocket, Any]]:
    """A v1 websocket per kernel, each running ``stream N every S`` long enough to outlast the window; the websockets
    that could not be opened are noted in ``failures``."""
    count = int((args.window + args.poll_window + 120) / args.stream_every)
    streams = []
    for kid in kernel_ids:
        try:
            ws = await KernelWebSocket("v1").connect(gw.ws_url, kid, gw.headers, timeout=60)
        except Exception as exc:  # counted and reported; the window runs with the clients that connected
            failures.append(f"{type(exc).__name__}: {exc}")
            continue
        streams.append((kid, ws, ws.execute(f"stream {count} every {args.stream_every}")))
    # every stream has begun (its first message arrived) before the window starts
    deadline = perf() + 60
    while any(p.streams == 0 and not ws.closed for _, ws, p in streams):
        if perf() > deadline:
            raise TimeoutError("not every kernel began to stream within 60 s")
        await asyncio.sleep(0.1)
    for _, ws, p in streams:
        if ws.closed:
            failures.append("websocket closed by the gateway before streaming")
            p.future.cancel()  # nobody waits for it
    return [s for s in streams if not s[1].closed]


async def close_streams(gw: Gateway, streams: list[tuple[str, KernelWebSocket, Any]]) -> dict[str, Any]:
    """Interrupt every streaming kernel over the REST API (SIGINT) and wait for each request's reply."""
    await asyncio.gather(*(gw.fetch("POST", f"/api/kernels/{kid}/interrupt", {}, 60) for kid, _, _ in streams))
    ended, closed = 0, sum(1 for _, ws, _ in streams if ws.closed)
    for _, ws, p in streams:
        try:
            await ws.wait(p, 60)
            ended += p.reply_type == "execute_reply"
        except Exception:  # a websocket the gateway closed: counted as not replied
            pass
        ws.close()
    return {"interrupted_and_replied": ended, "of": len(streams),
            "closed_by_gateway_during_window": closed}


async def phase(gw: Gateway, kernels: Kernels, label: str, n_streams: int, seconds: float,
                args: argparse.Namespace) -> dict[str, Any]:
    log(f"[{label}] {len(gw.kernel_ids)} kernels idle for {seconds:g} s")
    idle = await window(gw, kernels, seconds, args)
    streaming_ids = sorted(gw.kernel_ids)[:n_streams]
    log(f"[{label}] {len(streaming_ids)} of them streaming (one message every {args.stream_every:g} s each) "
        f"to {len(streaming_ids)} websocket clients for {seconds:g} s")
    failures: list[str] = []
    streams = await open_streams(gw, streaming_ids, args, failures)
    if failures:
        log(f"[{label}] {len(failures)} websockets failed: {failures[0]}")
    try:
        busy = await window(gw, kernels, seconds, args, streams)
    finally:
        busy_end = await close_streams(gw, streams)
    busy["streams"].update(busy_end, websockets_failed=len(failures), websocket_errors=failures[:3])
    return {"kernels": len(gw.kernel_ids), "idle": idle, "streaming": busy}


async def amain(args: argparse.Namespace, tmp: Path, results: dict[str, Any]) -> None:
    from tornado.httpclient import AsyncHTTPClient

    AsyncHTTPClient.configure(None, max_clients=max(64, args.concurrency * 2))
    env = {"PYTHONPATH": str(args.gateway_root), "JUPYTER_PATH": str(tmp / "share" / "jupyter"),
           "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTER_DATA_DIR": str(tmp / "data"),
           "JUPYTER_CONFIG_DIR": str(tmp / "config"), "GATEWAY_PORT_RANGE": args.port_range,
           "GATEWAY_DEFAULT_KERNEL_NAME": SPEC, "GATEWAY_MAX_KERNELS": "0", "GATEWAY_CULL_IDLE_TIMEOUT": "0",
           "GATEWAY_KERNEL_LAUNCH_TIMEOUT": str(args.start_timeout)}
    gw = Gateway("gateway", OURS_CMD, tmp, args.gateway_arg, env)
    results["gw"] = gw
    results["meta"]["ready_s"] = gw.start(60)
    pid = gw.proc.pid
    if args.gateway_nice:  # every thread there is now; later ones inherit it (the kernels too: see renice)
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), args.gateway_nice)
    results["meta"]["gateway_nofile"] = Path(f"/proc/{pid}/limits").read_text().split("Max open files")[1].split()[:2]
    kernels = Kernels(gw)
    results["startup"] = {"rss_mb": (ps.rss_kb(pid) or 0) / 1024, "fds": open_fds(pid), "threads": proc_field(pid, "Threads")}
    log(f"[gateway] ready (pid {pid}), rss {results['startup']['rss_mb']:.1f} MB; starting {args.baseline} kernels")

    results["start_baseline"] = await start_kernels(gw, args.baseline, args.concurrency, args.start_timeout)
    if args.gateway_nice:
        kernels.renice(0)
    results["baseline"] = await phase(gw, kernels, "baseline", args.baseline, args.baseline_window, args)

    log(f"[main] starting {args.kernels - args.baseline} more kernels, {args.concurrency} at a time")
    results["start_main"] = await start_kernels(gw, args.kernels - args.baseline, args.concurrency, args.start_timeout)
    if args.gateway_nice:
        kernels.renice(0)
    log(f"[main] {len(gw.kernel_ids)} kernels in {results['start_main']['wall_s']:.0f} s "
        f"({results['start_main']['failed']} failed)")
    if args.settle > 0:
        await asyncio.sleep(args.settle)  # let the start burst's garbage and log flushing pass before measuring
    results["main"] = await phase(gw, kernels, "main", args.streams, args.window, args)

    log(f"[end] deleting {len(gw.kernel_ids)} kernels")
    results["delete"] = await delete_kernels(gw, args.concurrency)
    deadline = perf() + 60
    while kernels.pids() and perf() < deadline:
        await asyncio.sleep(0.2)  # processes reaped by the gateway after DELETE answered
    results["delete"]["kernel_processes_left"] = len(kernels.pids())
    results["delete"]["gateway_rss_mb_after"] = (ps.rss_kb(pid) or 0) / 1024
    results["delete"]["gateway_fds_after"] = open_fds(pid)


# -------------------------------------------------------------------------------------------------------------------
# report
# -------------------------------------------------------------------------------------------------------------------
def _rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure label, path into a window's dict, unit) for every reported figure."""
    return [("loop lag p99 (<= bucket)", "lag.p99_le_s", "ms"), ("loop lag mean", "lag.mean_s", "ms"),
            ("GET /api/kernels median", "list.median_ms", ""), ("GET /api/kernels p99", "list.p99_ms", ""),
            ("  time in the gateway median", "list.served_median_ms", ""),
            ("  time in the gateway p99", "list.served_p99_ms", ""),
            ("gateway RSS MB", "gateway.rss_mb", ""), ("gateway CPU %", "gateway.cpu_pct", ""),
            ("loop thread waiting for a CPU %", "gateway.runqueue_wait_pct", ""),
            ("gateway open fds", "gateway.fds", ""), ("gateway threads", "gateway.threads", ""),
            ("process polls / 3 s", "polls.per_poll_interval", ""), ("kernels RSS sum MB", "kernels.rss_mb", ""),
            ("kernels PSS sum MB", "kernels.pss_mb", ""), ("kernels CPU %", "kernels.cpu_pct", ""),
            ("this client's CPU %", "client_cpu_pct", ""), ("load average (1 min)", "loadavg", ""),
            ("stream msgs/s delivered", "streams.msgs_per_s", ""),
            ("gw CPU ms per 1k msgs", "streams.gateway_cpu_ms_per_1k_msgs", "")]


def _get(d: dict[str, Any] | None, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    meta = results["meta"]
    print(f"\n1,000-kernel benchmark: {platform.platform()}, {os.cpu_count()} CPUs, load "
          f"{', '.join(f'{x:.1f}' for x in meta['loadavg_start'])} -> {', '.join(f'{x:.1f}' for x in meta.get('loadavg_end', ()))}"
          f"; gateway open-file limit {meta.get('gateway_nofile')}")
    if "error" in meta:
        print(f"FAILED: {meta['error']}")
    for key in ("start_baseline", "start_main"):
        s = results.get(key)
        if s:
            print(f"{key}: {s['started']} started, {s['failed']} failed in {s['wall_s']:.1f} s ({s['per_s']:.1f}/s), "
                  f"POST median {s['post_median_s']:.2f} s, p99 {s['post_p99_s']:.2f} s" + (
                      f"; errors: {s['errors']}" if s["errors"] else ""))
    base, main = results.get("baseline"), results.get("main")
    if not (base and main):
        return
    for state in ("idle", "streaming"):
        b, m = base[state], main[state]
        rows = []
        for label, path, unit in _rows(results):
            bv, mv = _get(b, path), _get(m, path)
            if bv is None and mv is None:
                continue
            scale = 1000 if unit == "ms" else 1
            bv = bv * scale if isinstance(bv, (int, float)) else bv
            mv = mv * scale if isinstance(mv, (int, float)) else mv
            rows.append([label + (" ms" if unit == "ms" else ""), bv, mv,
                         mv / bv if isinstance(bv, (int, float)) and isinstance(mv, (int, float)) and bv else None])
        streams = (f", {m['streams']['clients']} vs {b['streams']['clients']} streaming clients"
                   + (f" ({m['streams']['websockets_failed']} websockets failed to open: "
                      f"{m['streams']['websocket_errors'][:1]})" if m["streams"].get("websockets_failed") else "")
                   if state == "streaming" else "")
        table(f"{state}: {base['kernels']} kernels (baseline) vs {main['kernels']} kernels{streams}",
              ["figure", f"{base['kernels']} kernels", f"{main['kernels']} kernels", "ratio"], rows)
    d = results.get("delete") or {}
    print(f"\ndelete: {d.get('deleted')} deleted, {d.get('failed')} failed in {d.get('wall_s', 0):.1f} s; "
          f"kernel processes left: {d.get('kernel_processes_left')}; left after the gateway stopped: "
          f"{meta.get('leftover_processes')}; gateway RSS after {d.get('gateway_rss_mb_after', 0):.1f} MB, "
          f"fds {d.get('gateway_fds_after')}")
    print("\ngoals (issue 11), with", main["kernels"], "kernels:")
    for state in ("idle", "streaming"):
        m, b = main[state], base[state]
        polls_m, polls_b = _get(m, "polls.per_poll_interval"), _get(b, "polls.per_poll_interval")
        goals = [
            ("event-loop lag p99 < 50 ms", _get(m, "lag.p99_le_s"), lambda v: v is not None and v < GOAL_LAG_P99_S + 1e-9),
            ("GET /api/kernels p99 < 100 ms (at the client)", _get(m, "list.p99_ms"),
             lambda v: v is not None and v < GOAL_LIST_S * 1000),
            ("GET /api/kernels p99 < 100 ms (time in the gateway, its access log)", _get(m, "list.served_p99_ms"),
             lambda v: v is not None and v < GOAL_LIST_S * 1000),
            ("gateway RSS < 500 MB", _get(m, "gateway.rss_mb"), lambda v: v is not None and v < GOAL_RSS_MB),
            (f"process polls per {POLL_INTERVAL_S:g} s independent of kernel count ({polls_b} with "
             f"{base['kernels']}, {polls_m} with {main['kernels']})", polls_m,
             lambda v: v is not None and polls_b is not None and v <= max(2 * polls_b, polls_b + 5)),
        ]
        for what, value, ok in goals:
            print(f"  [{state:9}] {'met    ' if ok(value) else 'NOT met'}  {what}: {value if not isinstance(value, float) else round(value, 3)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", type=int, default=1000, help="kernels held in the main phase (default 1000)")
    ap.add_argument("--baseline", type=int, default=10, help="kernels in the baseline phase (default 10)")
    ap.add_argument("--streams", type=int, default=100, help="kernels streaming in the main phase (default 100)")
    ap.add_argument("--stream-every", type=float, default=0.05, help="seconds between one kernel's stream messages")
    ap.add_argument("--concurrency", type=int, default=20, help="kernel starts (and deletes) at once")
    ap.add_argument("--window", type=float, default=60.0, help="seconds each main-phase window lasts")
    ap.add_argument("--baseline-window", type=float, default=30.0, help="seconds each baseline window lasts")
    ap.add_argument("--poll-window", type=float, default=9.0,
                    help="seconds strace counts the gateway's process polls after each window; 0: skip")
    ap.add_argument("--list-requests", type=int, default=50, help="GET /api/kernels requests per window")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after the last start before measuring")
    ap.add_argument("--port-range", default="20000..29999", help="kernel ports (6 a kernel)")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds one kernel start may take")
    ap.add_argument("--gateway-root", type=Path, default=REPO,
                    help="source tree the gateway runs from (PYTHONPATH), e.g. a patched scratch copy")
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra gateway argument (repeatable)")
    ap.add_argument("--gateway-nice", type=int, default=0,
                    help="nice value for the gateway (e.g. -10, needs root): its own cost without competing for a "
                         "CPU with the kernels and whatever else runs on the machine")
    ap.add_argument("--json", type=Path, help="write all figures as JSON to this file")
    args = ap.parse_args(argv)
    if args.kernels <= args.baseline or args.baseline < 1:
        ap.error("--kernels must be more than --baseline, and --baseline at least 1")
    low, high = (int(p) for p in args.port_range.split(".."))
    if (high - low + 1) < 6 * args.kernels:
        ap.error(f"--port-range {args.port_range} holds fewer than 6 ports for each of {args.kernels} kernels")
    args.streams = min(args.streams, args.kernels)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the gateway child inherits it
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)
    results: dict[str, Any] = {"meta": {**run_meta(args), "nofile": [soft, want, hard]}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-1k-"))
    kdir = tmp / "share" / "jupyter" / "kernels" / SPEC
    shutil.copytree(KERNEL_DIR, kdir, ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("runtime", "data", "config"):
        (tmp / sub).mkdir()
    gw: Gateway | None = None
    try:
        status = guarded(results, lambda: asyncio.run(amain(args, tmp, results)))
    finally:
        gw = results.pop("gw", None)
        if gw is not None:
            if gw.kernel_ids and gw.proc and gw.proc.poll() is None:
                gw._http = None  # its client belonged to the finished event loop
                try:
                    asyncio.run(delete_kernels(gw, args.concurrency))
                except Exception as exc:
                    log(f"  cleanup: DELETE failed: {exc!r}")
            gw.stop()  # also kills, by pid, any child of the gateway it saw and that is still there
            results["meta"]["gateway_log_tail"] = gw.log_tail(5)
        # kernels name their connection file in tmp: any process that does is a leak, killed by pid
        results["meta"]["leftover_processes"] = len(sweep(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
    end_run(results, lambda: report(results, args), args.json)
    d = results.get("delete") or {}
    if status == 0 and (d.get("kernel_processes_left") or results["meta"]["leftover_processes"]):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
