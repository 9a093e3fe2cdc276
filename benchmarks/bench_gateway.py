#!/usr/bin/env python
"""Benchmark the kernel gateway against jupyter_client talking straight to a kernel over ZMQ.

One run starts everything it needs (an isolated kernelspec and runtime dir, our gateway
as a subprocess, optionally Jupyter Kernel Gateway 3.0 as a peer) and measures:

1. execute round trip (until execute_reply AND iopub idle): median / p99,
   gateway over websocket (legacy JSON and v1 binary) vs direct ZMQ;
2. output flood: one cell emitting exactly N iopub stream messages: delivered count,
   final idle, time to idle;
3. kernel start until the first kernel_info_reply (sequential, and C concurrently);
4. gateway memory (VmRSS of the gateway process and, separately, its children)
   at idle and per running kernel.

Usage:  python benchmarks/bench_gateway.py [--quick] [--peer kg] [--json out.json]
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import queue
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import _procstat as ps  # noqa: E402
from _wsclient import KernelWebSocket  # noqa: E402

perf = time.perf_counter

OURS_CMD = "{python} -m kernel_gateway --ip=127.0.0.1 --port={port} --auth-token={token}"
KG_CMD = ("{venv}/bin/python -m kernel_gateway --ip=127.0.0.1 --port={port} --port_retries=0 "
          "--KernelGatewayApp.auth_token={token} --JupyterWebsocketPersonality.list_kernels=True")
KG_REQUIREMENT = "jupyter_kernel_gateway==3.0.1"

# Emits exactly n separate iopub stream messages parented to the current execute_request.
FLOOD_CODE = (
    "k = get_ipython().kernel\n"
    "_p = k.get_parent('shell')\n"
    "_s, _sock = k.session, k.iopub_socket\n"
    "for _i in range({n}):\n"
    "    _s.send(_sock, 'stream', {{'name': 'stdout', 'text': f'{{_i}}\\n'}}, parent=_p)\n"
)


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values, q):
    """Nearest-rank percentile."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def summarize(times_s):
    if not times_s:
        return {}
    ms = [t * 1000 for t in times_s]
    return {"n": len(ms), "median_ms": statistics.median(ms), "p99_ms": pct(ms, 99),
            "mean_ms": statistics.fmean(ms), "min_ms": min(ms), "max_ms": max(ms)}


class CpuMeter:
    """CPU seconds consumed by the gateway process, its descendants (kernels) and this client."""

    def __init__(self, gateway_pid=None, kernel_pids=None):
        self.gateway_pid = gateway_pid
        self.kernel_pids = kernel_pids

    def _snap(self):
        gw = ps.cpu_seconds(self.gateway_pid) if self.gateway_pid else 0.0
        if self.kernel_pids is not None:
            kern = sum(ps.cpu_seconds(p) for p in self.kernel_pids)
        elif self.gateway_pid:
            kern = ps.tree_cpu(self.gateway_pid)[1]
        else:
            kern = 0.0
        return gw, kern, time.process_time()

    def __enter__(self):
        self.start = self._snap()
        return self

    def __exit__(self, *exc):
        end = self._snap()
        self.gateway, self.kernel, self.client = (b - a for a, b in zip(self.start, end))
        return False

    def as_dict(self, per=1):
        d = {"kernel_cpu_s": self.kernel / per, "client_cpu_s": self.client / per}
        if self.gateway_pid:
            d["gateway_cpu_s"] = self.gateway / per
        return d


def setup_isolated_env(tmp: Path, kernel_python: str) -> dict:
    """A private kernelspec ``python3`` (absolute interpreter) + runtime/config dirs for every path."""
    kdir = tmp / "share" / "jupyter" / "kernels" / "python3"
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [kernel_python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (bench)", "language": "python"}))
    env = {
        "JUPYTER_PATH": str(tmp / "share" / "jupyter"),
        "JUPYTER_DATA_DIR": str(tmp / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
        "JUPYTER_CONFIG_DIR": str(tmp / "config"),
        "IPYTHONDIR": str(tmp / "ipython"),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }
    for k in ("JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_CONFIG_DIR", "IPYTHONDIR"):
        Path(env[k]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)  # direct kernels inherit it; gateways get os.environ too
    return env


# ----------------------------------------------------------------------------------------------
# gateway process
# ----------------------------------------------------------------------------------------------
class Gateway:
    def __init__(self, name: str, cmd: str, tmp: Path, extra_args=(), env_extra=None, venv=None):
        self.name = name
        self.cmd = cmd
        self.tmp = tmp
        self.extra_args = list(extra_args)
        self.env_extra = env_extra or {}
        self.venv = venv
        self.proc = None
        self.port = None
        self.token = secrets.token_hex(16)
        self.log_path = None
        self.seen_children: set[int] = set()
        self.kernel_ids: set[str] = set()
        self._http = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self):
        return f"ws://127.0.0.1:{self.port}"

    @property
    def headers(self):
        return {"Authorization": f"token {self.token}"}

    def argv(self):
        self.port = free_port()
        s = self.cmd.format(python=shlex.quote(sys.executable), port=self.port, token=self.token,
                            venv=shlex.quote(str(self.venv)) if self.venv else "")
        return shlex.split(s) + self.extra_args

    def start(self, timeout: float) -> float:
        argv = self.argv()
        env = dict(os.environ)
        env.update(self.env_extra)
        self.log_path = self.tmp / f"{self.name}-{self.port}.log"
        t0 = perf()
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.tmp, start_new_session=True)
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {' '.join(argv)}\n"
                                   + self.log_tail())
            for path in ("/api", "/readyz"):
                try:
                    req = urllib.request.Request(self.url + path, headers=self.headers)
                    with urllib.request.urlopen(req, timeout=2) as r:
                        if r.status == 200:
                            return perf() - t0
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
            if perf() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} not ready after {timeout}s\n" + self.log_tail())
            time.sleep(0.05)

    def log_tail(self, n=30):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def remember_children(self):
        if self.proc and self.proc.poll() is None:
            self.seen_children.update(ps.descendants(self.proc.pid))

    @property
    def http(self):
        if self._http is None:
            from tornado.httpclient import AsyncHTTPClient
            self._http = AsyncHTTPClient(force_instance=True, max_clients=64)
        return self._http

    async def fetch(self, method, path, body=None, timeout=120.0):
        from tornado.httpclient import HTTPRequest
        req = HTTPRequest(self.url + path, method=method, headers={**self.headers, "Content-Type": "application/json"},
                          body=None if body is None else json.dumps(body), connect_timeout=timeout,
                          request_timeout=timeout, allow_nonstandard_methods=True)
        return await self.http.fetch(req, raise_error=False)

    async def create_kernel(self, timeout):
        r = await self.fetch("POST", "/api/kernels", {"name": None}, timeout)
        if r.code not in (200, 201):
            raise RuntimeError(f"POST /api/kernels -> {r.code} {r.body[:300]!r}")
        kid = json.loads(r.body)["id"]
        self.kernel_ids.add(kid)
        return kid

    async def delete_kernel(self, kid, timeout=60.0):
        r = await self.fetch("DELETE", f"/api/kernels/{kid}", None, timeout)
        self.kernel_ids.discard(kid)
        if r.code not in (200, 204):
            log(f"  [{self.name}] DELETE {kid} -> {r.code}")
        return r.code

    async def delete_all(self):
        ids = list(self.kernel_ids)
        if ids:
            await asyncio.gather(*(self.delete_kernel(k) for k in ids), return_exceptions=True)

    def stop(self):
        if self.proc is None:
            return
        self.remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # kernels the gateway failed to clean up: only pids we saw as its descendants
        for pid in self.seen_children:
            try:
                with open(f"/proc/{pid}/status") as f:
                    if "State:\tZ" in f.read():
                        continue
                os.kill(pid, signal.SIGKILL)
                log(f"  [{self.name}] killed leftover child {pid}")
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                pass
        if self._http is not None:
            self._http.close()
            self._http = None


# ----------------------------------------------------------------------------------------------
# gateway measurements
# ----------------------------------------------------------------------------------------------
async def ws_kernel_info(ws: KernelWebSocket, timeout: float, retry: float = 10.0):
    deadline = perf() + timeout
    while True:
        p = ws.kernel_info()
        try:
            return await ws.wait(p, max(0.1, min(retry, deadline - perf())))
        except asyncio.TimeoutError:
            if perf() >= deadline:
                raise TimeoutError("no kernel_info_reply") from None


async def gw_start_once(gw: Gateway, args, keep=False):
    t0 = perf()
    kid = await gw.create_kernel(args.start_timeout)
    t1 = perf()
    ws = KernelWebSocket(args.start_protocol)
    await ws.connect(gw.ws_url, kid, gw.headers, timeout=args.start_timeout)
    t2 = perf()
    await ws_kernel_info(ws, args.start_timeout)
    t3 = perf()
    rec = {"total_s": t3 - t0, "post_s": t1 - t0, "ws_connect_s": t2 - t1, "kernel_info_s": t3 - t2}
    if keep:
        return rec, kid, ws
    ws.close()
    t4 = perf()
    await gw.delete_kernel(kid)
    rec["delete_s"] = perf() - t4
    return rec, None, None


async def ws_round_trips(ws: KernelWebSocket, args, meter: CpuMeter):
    code, timeout = args.code, args.timeout
    for _ in range(args.warmup):
        p = await ws.wait(ws.execute(code), timeout)
    times, errors = [], 0
    with meter:
        for _ in range(args.iterations):
            t0 = perf()
            p = await ws.wait(ws.execute(code), timeout)
            times.append(max(p.t_reply, p.t_idle) - t0)
            if (p.reply or {}).get("status") != "ok":
                errors += 1
    return {**summarize(times), "errors": errors, **meter.as_dict(per=args.iterations)}


async def ws_flood(ws: KernelWebSocket, args, meter: CpuMeter):
    runs = []
    for _ in range(args.flood_repeats):
        with meter:
            t0 = perf()
            p = ws.execute(FLOOD_CODE.format(n=args.flood))
            timed_out = False
            try:
                await ws.wait(p, args.flood_timeout)
            except asyncio.TimeoutError:
                timed_out = True
        end = p.t_idle if p.t_idle is not None else perf()
        runs.append({"delivered": p.streams, "other_streams": p.other_streams, "idle": p.t_idle is not None,
                     "reply": (p.reply or {}).get("status"), "timed_out": timed_out,
                     "time_to_idle_s": end - t0, "msgs_per_s": p.streams / (end - t0),
                     **meter.as_dict()})
        if timed_out:
            break
        await asyncio.sleep(0.2)
    return flood_summary(runs)


def flood_summary(runs):
    best = sorted(runs, key=lambda r: r["time_to_idle_s"])[len(runs) // 2]  # median run by time
    return {"runs": runs, **{k: best[k] for k in best},
            "all_complete": all(r["idle"] and r["delivered"] == r.get("expected", r["delivered"]) for r in runs)}


async def run_gateway(gw: Gateway, args) -> dict:
    res = {"kind": "gateway", "cmd": gw.cmd, "extra_args": gw.extra_args}
    log(f"[{gw.name}] starting: {gw.cmd}")
    res["ready_s"] = gw.start(args.start_timeout)
    res["pid"] = gw.proc.pid
    await asyncio.sleep(0.5)
    rss, kids_rss, nkids = ps.tree_rss_kb(gw.proc.pid)
    res["mem_startup"] = {"gateway_rss_mb": rss / 1024, "children_rss_mb": kids_rss / 1024, "children": nkids}
    log(f"[{gw.name}] ready in {res['ready_s']:.2f}s, rss {rss / 1024:.1f} MB")

    if "start" in args.sections:
        log(f"[{gw.name}] kernel starts x{args.starts} (+1 warm-up)")
        await gw_start_once(gw, args)
        recs = [(await gw_start_once(gw, args))[0] for _ in range(args.starts)]
        res["start"] = {k: statistics.median(r[k] for r in recs) for k in recs[0]}
        res["start"]["n"] = len(recs)

    if "rt" in args.sections or "flood" in args.sections:
        kid = await gw.create_kernel(args.start_timeout)
        gw.remember_children()
        for proto in args.protocols:
            key = f"ws-{'json' if proto == 'legacy' else 'v1'}"
            ws = KernelWebSocket(proto)
            try:
                await ws.connect(gw.ws_url, kid, gw.headers, timeout=args.timeout)
            except Exception as e:  # e.g. v1 not offered by the server
                res.setdefault("errors", {})[key] = repr(e)
                log(f"[{gw.name}] {key}: {e!r}")
                continue
            res.setdefault("client_tcp_nodelay", ws.nodelay())
            await ws_kernel_info(ws, args.start_timeout)
            meter = CpuMeter(gateway_pid=gw.proc.pid)
            if "rt" in args.sections:
                log(f"[{gw.name}] {key}: round trips x{args.iterations}")
                res.setdefault("rt", {})[key] = await ws_round_trips(ws, args, meter)
            if "flood" in args.sections:
                log(f"[{gw.name}] {key}: flood {args.flood} x{args.flood_repeats}")
                fl = await ws_flood(ws, args, meter)
                for r in fl["runs"]:
                    r["expected"] = args.flood
                fl["all_complete"] = all(r["idle"] and r["delivered"] == args.flood for r in fl["runs"])
                res.setdefault("flood", {})[key] = fl
            res.setdefault("ws_unmatched", {})[key] = ws.unmatched
            ws.close()
        await gw.delete_kernel(kid)
        await asyncio.sleep(0.5)

    if "concurrent" in args.sections:
        n = args.concurrent
        await asyncio.sleep(0.5)
        rss0, kids0, _ = ps.tree_rss_kb(gw.proc.pid)
        log(f"[{gw.name}] {n} concurrent kernel starts")
        t0 = perf()
        out = await asyncio.wait_for(asyncio.gather(*(gw_start_once(gw, args, keep=True) for _ in range(n))),
                                     args.start_timeout * 2)
        wall = perf() - t0
        gw.remember_children()
        await asyncio.sleep(1.0)
        rss1, kids1, nk1 = ps.tree_rss_kb(gw.proc.pid)
        for _, _, ws in out:
            ws.close()
        await asyncio.sleep(1.0)
        rss2, kids2, nk2 = ps.tree_rss_kb(gw.proc.pid)
        t1 = perf()
        await asyncio.gather(*(gw.delete_kernel(kid) for _, kid, _ in out))
        del_wall = perf() - t1
        await asyncio.sleep(1.0)
        rss3, kids3, nk3 = ps.tree_rss_kb(gw.proc.pid)
        res["concurrent"] = {"n": n, "wall_s": wall, "median_s": statistics.median(r["total_s"] for r, _, _ in out),
                             "max_s": max(r["total_s"] for r, _, _ in out), "delete_all_s": del_wall}
        res["mem"] = {
            "idle_startup_mb": res["mem_startup"]["gateway_rss_mb"],
            "idle_before_mb": rss0 / 1024,
            "with_kernels_ws_mb": rss1 / 1024,
            "with_kernels_no_ws_mb": rss2 / 1024,
            "after_delete_mb": rss3 / 1024,
            "per_kernel_ws_mb": (rss1 - rss0) / 1024 / n,
            "per_kernel_no_ws_mb": (rss2 - rss0) / 1024 / n,
            "children": nk1,
            "children_rss_mb": kids1 / 1024,
            "kernel_rss_per_kernel_mb": kids1 / 1024 / max(1, nk1),
            "children_after_delete": nk3,
        }
    return res


# ----------------------------------------------------------------------------------------------
# direct (jupyter_client over ZMQ) measurements
# ----------------------------------------------------------------------------------------------
def _mid(msg):
    return (msg.get("parent_header") or {}).get("msg_id")


async def direct_exec(kc, code, timeout):
    """jupyter_client API: kc.execute + get_msg on iopub (until idle) and shell (reply)."""
    t0 = perf()
    msg_id = kc.execute(code, store_history=False)
    deadline = t0 + timeout
    stdout = other = 0
    while True:
        try:
            msg = await kc.iopub_channel.get_msg(timeout=max(0.001, deadline - perf()))
        except queue.Empty:
            raise asyncio.TimeoutError() from None
        if _mid(msg) != msg_id:
            continue
        mt = msg["msg_type"]
        if mt == "stream":
            if msg["content"].get("name") == "stdout":
                stdout += 1
            else:
                other += 1
        elif mt == "status" and msg["content"]["execution_state"] == "idle":
            t_idle = perf()
            break
    while True:
        try:
            msg = await kc.shell_channel.get_msg(timeout=max(0.001, deadline - perf()))
        except queue.Empty:
            raise asyncio.TimeoutError() from None
        if _mid(msg) == msg_id:
            t_reply = perf()
            break
    return {"t0": t0, "end": max(t_idle, t_reply), "stdout": stdout, "other": other,
            "status": msg["content"].get("status")}


_DELIM = b"<IDS|MSG>"


async def direct_exec_raw(kc, code, timeout):
    """Same sockets, but recv_multipart + decode only parent/header (what a lean proxy must do)."""
    loads = json.loads

    async def run():
        t0 = perf()
        msg_id = kc.execute(code, store_history=False)
        stdout = other = 0
        iopub = kc.iopub_channel.socket
        while True:
            frames = await iopub.recv_multipart()
            i = frames.index(_DELIM)
            parent = loads(frames[i + 3])
            if parent.get("msg_id") != msg_id:
                continue
            mt = loads(frames[i + 2])["msg_type"]
            if mt == "stream":
                if loads(frames[i + 5]).get("name") == "stdout":
                    stdout += 1
                else:
                    other += 1
            elif mt == "status" and loads(frames[i + 5])["execution_state"] == "idle":
                t_idle = perf()
                break
        shell = kc.shell_channel.socket
        while True:
            frames = await shell.recv_multipart()
            i = frames.index(_DELIM)
            if loads(frames[i + 3]).get("msg_id") == msg_id:
                t_reply = perf()
                content = loads(frames[i + 5])
                break
        return {"t0": t0, "end": max(t_idle, t_reply), "stdout": stdout, "other": other,
                "status": content.get("status")}

    return await asyncio.wait_for(run(), timeout)


async def direct_kernel_info(kc, timeout, retry=10.0):
    deadline = perf() + timeout
    while True:
        msg_id = kc.kernel_info()
        sub_deadline = min(deadline, perf() + retry)
        while perf() < sub_deadline:
            try:
                msg = await kc.shell_channel.get_msg(timeout=max(0.001, sub_deadline - perf()))
            except queue.Empty:
                break
            if _mid(msg) == msg_id:
                return msg
        if perf() >= deadline:
            raise TimeoutError("no kernel_info_reply (direct)")


async def direct_start_once(args, keep=False):
    from jupyter_client.manager import AsyncKernelManager

    t0 = perf()
    km = AsyncKernelManager(kernel_name="python3")
    await km.start_kernel()
    t1 = perf()
    kc = km.client()
    kc.start_channels()
    await direct_kernel_info(kc, args.start_timeout)
    t2 = perf()
    rec = {"total_s": t2 - t0, "launch_s": t1 - t0, "kernel_info_s": t2 - t1}
    if keep:
        return rec, km, kc
    await direct_stop(km, kc)
    return rec, None, None


async def direct_stop(km, kc):
    try:
        kc.stop_channels()
    finally:
        await km.shutdown_kernel(now=True)


def kernel_pid(km):
    prov = getattr(km, "provisioner", None)
    return getattr(prov, "pid", None) or getattr(getattr(prov, "process", None), "pid", None)


async def run_direct(args) -> dict:
    res = {"kind": "direct"}
    if "start" in args.sections:
        log(f"[direct] kernel starts x{args.starts} (+1 warm-up)")
        await direct_start_once(args)
        recs = [(await direct_start_once(args))[0] for _ in range(args.starts)]
        res["start"] = {k: statistics.median(r[k] for r in recs) for k in recs[0]}
        res["start"]["n"] = len(recs)

    if "rt" in args.sections or "flood" in args.sections:
        _, km, kc = await direct_start_once(args, keep=True)
        pid = kernel_pid(km)
        try:
            for key, fn in (("zmq", direct_exec), ("zmq-raw", direct_exec_raw)):
                if key == "zmq-raw" and not args.raw:
                    continue
                meter = CpuMeter(kernel_pids=[pid] if pid else [])
                if "rt" in args.sections:
                    log(f"[direct] {key}: round trips x{args.iterations}")
                    for _ in range(args.warmup):
                        await fn(kc, args.code, args.timeout)
                    times, errors = [], 0
                    with meter:
                        for _ in range(args.iterations):
                            r = await fn(kc, args.code, args.timeout)
                            times.append(r["end"] - r["t0"])
                            errors += r["status"] != "ok"
                    res.setdefault("rt", {})[key] = {**summarize(times), "errors": errors,
                                                     **meter.as_dict(per=args.iterations)}
                if "flood" in args.sections:
                    log(f"[direct] {key}: flood {args.flood} x{args.flood_repeats}")
                    runs = []
                    for _ in range(args.flood_repeats):
                        with meter:
                            t0 = perf()
                            try:
                                r = await fn(kc, FLOOD_CODE.format(n=args.flood), args.flood_timeout)
                                run = {"delivered": r["stdout"], "other_streams": r["other"], "idle": True,
                                       "reply": r["status"], "timed_out": False,
                                       "time_to_idle_s": r["end"] - r["t0"]}
                            except asyncio.TimeoutError:
                                run = {"delivered": None, "other_streams": None, "idle": False, "reply": None,
                                       "timed_out": True, "time_to_idle_s": perf() - t0}
                        run["msgs_per_s"] = (run["delivered"] or 0) / run["time_to_idle_s"]
                        run["expected"] = args.flood
                        runs.append({**run, **meter.as_dict()})
                        if run["timed_out"]:
                            break
                        await asyncio.sleep(0.2)
                    fl = flood_summary(runs)
                    fl["all_complete"] = all(r["idle"] and r["delivered"] == args.flood for r in runs)
                    res.setdefault("flood", {})[key] = fl
        finally:
            await direct_stop(km, kc)

    if "concurrent" in args.sections:
        n = args.concurrent
        log(f"[direct] {n} concurrent kernel starts")
        t0 = perf()
        out = await asyncio.wait_for(asyncio.gather(*(direct_start_once(args, keep=True) for _ in range(n))),
                                     args.start_timeout * 2)
        wall = perf() - t0
        await asyncio.sleep(1.0)
        pids = [kernel_pid(km) for _, km, _ in out]
        kern_rss = [ps.rss_kb(p) or 0 for p in pids if p]
        t1 = perf()
        await asyncio.gather(*(direct_stop(km, kc) for _, km, kc in out))
        res["concurrent"] = {"n": n, "wall_s": wall, "median_s": statistics.median(r["total_s"] for r, _, _ in out),
                             "max_s": max(r["total_s"] for r, _, _ in out), "delete_all_s": perf() - t1}
        res["mem"] = {"kernel_rss_per_kernel_mb": sum(kern_rss) / 1024 / max(1, len(kern_rss))}
    return res


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def f(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(title, header, rows):
    print(f"\n== {title} ==")
    cols = [header] + [[f(c) if not isinstance(c, str) else c for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    for j, r in enumerate(cols):
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def ratio(a, b):
    return a / b if (a is not None and b) else None


def report(results, args):
    targets = results["targets"]
    direct = targets.get("direct", {})
    drt = direct.get("rt", {}).get("zmq", {})
    draw = direct.get("rt", {}).get("zmq-raw", {})
    rows = []
    for name, t in targets.items():
        for key, r in t.get("rt", {}).items():
            rows.append([f"{name} {key}", r.get("median_ms"), r.get("p99_ms"), ratio(r.get("median_ms"), drt.get("median_ms")),
                         ratio(r.get("p99_ms"), drt.get("p99_ms")), ratio(r.get("median_ms"), draw.get("median_ms")),
                         (r["gateway_cpu_s"] * 1000) if "gateway_cpu_s" in r else None, r["kernel_cpu_s"] * 1000,
                         r["client_cpu_s"] * 1000, r.get("errors")])
    if rows:
        table(f"execute round trip: {args.code!r} until execute_reply + idle, {args.iterations} iters "
              f"after {args.warmup} warm-up (ms)",
              ["path", "median", "p99", "x direct med", "x direct p99", "x raw med", "gw cpu/it", "kern cpu/it",
               "client cpu/it", "errors"], rows)

    dfl = direct.get("flood", {}).get("zmq", {})
    dfr = direct.get("flood", {}).get("zmq-raw", {})
    rows = []
    for name, t in targets.items():
        for key, r in t.get("flood", {}).items():
            rows.append([f"{name} {key}", f"{f(r.get('delivered'))}/{args.flood}", r.get("idle"), r.get("time_to_idle_s"),
                         (r.get("msgs_per_s") or 0) / 1000, ratio(r.get("time_to_idle_s"), dfl.get("time_to_idle_s")),
                         ratio(r.get("time_to_idle_s"), dfr.get("time_to_idle_s")),
                         r.get("gateway_cpu_s"), r.get("kernel_cpu_s"), r.get("client_cpu_s"), r.get("other_streams")])
    if rows:
        table(f"output flood: {args.flood} stream msgs in one cell, median of {args.flood_repeats} (s)",
              ["path", "delivered", "idle", "to idle", "kmsg/s", "x direct", "x raw", "gw cpu", "kern cpu",
               "client cpu", "other streams"], rows)

    ds = direct.get("start", {})
    dc = direct.get("concurrent", {})
    rows = []
    for name, t in targets.items():
        s, c = t.get("start"), t.get("concurrent")
        if not s and not c:
            continue
        s = s or {}
        c = c or {}
        rows.append([name, s.get("total_s"), ratio(s.get("total_s"), ds.get("total_s")),
                     s.get("post_s", s.get("launch_s")), s.get("ws_connect_s"), s.get("kernel_info_s"),
                     s.get("delete_s"), c.get("wall_s"), ratio(c.get("wall_s"), dc.get("wall_s")), c.get("max_s")])
    if rows:
        table(f"kernel start to first kernel_info_reply (median of {args.starts}) and {args.concurrent} concurrent (s)",
              ["target", "start", "x direct", "POST/launch", "ws connect", "kernel_info", "DELETE",
               f"{args.concurrent} conc wall", "x direct", "conc max"], rows)

    rows = []
    for name, t in targets.items():
        m = t.get("mem")
        if not m or t.get("kind") != "gateway":
            continue
        rows.append([name, m["idle_startup_mb"], m["idle_before_mb"], m["with_kernels_ws_mb"], m["per_kernel_ws_mb"],
                     m["per_kernel_no_ws_mb"], m["after_delete_mb"], m["kernel_rss_per_kernel_mb"],
                     f"{m['children']}->{m['children_after_delete']}"])
    if rows:
        table(f"gateway memory, VmRSS MB ({args.concurrent} kernels; children = kernels, counted separately)",
              ["gateway", "idle@start", "idle@before", f"{args.concurrent}k+ws", "per kernel+ws", "per kernel",
               "after delete", "kernel rss/k", "children"], rows)
        if direct.get("mem"):
            print(f"  (direct kernels: {direct['mem']['kernel_rss_per_kernel_mb']:.1f} MB RSS per kernel)")
    for name, t in targets.items():
        if t.get("error"):
            print(f"\n!! {name}: {t['error']}")
        for k, e in (t.get("errors") or {}).items():
            print(f"\n!! {name} {k}: {e}")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def ensure_peer_venv(path: Path) -> Path:
    py = path / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import kernel_gateway.gatewayapp"],
                                        capture_output=True, cwd="/").returncode == 0
    if not ok:
        log(f"[kg] creating peer venv {path} with {KG_REQUIREMENT}")
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", str(path)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", KG_REQUIREMENT], check=True)
    return path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--gateway-cmd", default=OURS_CMD,
                    help="command template for our gateway; placeholders {python} {port} {token}")
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra argument for our gateway")
    ap.add_argument("--gateway-name", default="ours")
    ap.add_argument("--no-gateway", action="store_true", help="do not run our gateway (e.g. with --peer kg)")
    ap.add_argument("--no-direct", action="store_true", help="skip the direct ZMQ baseline")
    ap.add_argument("--peer", action="append", default=[], choices=["kg"], help="also benchmark a peer server")
    ap.add_argument("--peer-venv", type=Path, default=HERE / ".peer-venv",
                    help="venv holding jupyter_kernel_gateway 3.0.1 (created with pip if missing)")
    ap.add_argument("--peer-arg", action="append", default=[], help="extra argument for the peer gateway")
    ap.add_argument("--kernel-python", default=sys.executable, help="interpreter of the benchmark kernelspec")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--code", default="1+1")
    ap.add_argument("--protocols", default="legacy,v1", help="websocket protocols: legacy,v1")
    ap.add_argument("--flood", type=int, default=20000, help="stream messages in the flood cell")
    ap.add_argument("--flood-repeats", type=int, default=3)
    ap.add_argument("--starts", type=int, default=5, help="sequential kernel starts (after 1 warm-up)")
    ap.add_argument("--concurrent", type=int, default=10)
    ap.add_argument("--start-protocol", default="legacy", choices=["legacy", "v1"])
    ap.add_argument("--sections", default="start,rt,flood,concurrent",
                    help="subset of start,rt,flood,concurrent (concurrent includes memory)")
    ap.add_argument("--no-raw", dest="raw", action="store_false", help="skip the raw-ZMQ direct variant")
    ap.add_argument("--timeout", type=float, default=30.0, help="per request")
    ap.add_argument("--flood-timeout", type=float, default=180.0)
    ap.add_argument("--start-timeout", type=float, default=120.0)
    ap.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    ap.add_argument("--json", type=Path, help="write all results to this file")
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.iterations, args.warmup, args.flood, args.flood_repeats = 30, 5, 2000, 1
        args.starts, args.concurrent = 1, 3
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    return args


async def amain(args, tmp: Path) -> dict:
    from tornado.httpclient import AsyncHTTPClient

    AsyncHTTPClient.configure(None, max_clients=64)
    results = {"meta": {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": sys.version.split()[0],
        "platform": platform.platform(), "cpus": os.cpu_count(), "kernel_python": args.kernel_python,
        "args": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                 for k, v in vars(args).items()},
    }, "targets": {}}
    try:
        import ipykernel
        import jupyter_client
        import tornado
        import zmq
        results["meta"]["versions"] = {"jupyter_client": jupyter_client.__version__, "ipykernel": ipykernel.__version__,
                                       "tornado": tornado.version, "pyzmq": zmq.__version__}
    except Exception:
        pass

    if not args.no_direct:
        try:
            results["targets"]["direct"] = await run_direct(args)
        except Exception as e:
            results["targets"]["direct"] = {"kind": "direct", "error": repr(e)}
            log(f"[direct] FAILED: {e!r}")

    gateways = []
    if not args.no_gateway:
        env = {"PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        gateways.append(Gateway(args.gateway_name, args.gateway_cmd, tmp, args.gateway_arg, env))
    for peer in args.peer:
        if peer == "kg":
            venv = ensure_peer_venv(args.peer_venv.resolve())
            gateways.append(Gateway("kg", KG_CMD, tmp, args.peer_arg, {"PYTHONPATH": ""}, venv=venv))
    for gw in gateways:
        try:
            results["targets"][gw.name] = await run_gateway(gw, args)
        except Exception as e:
            results["targets"][gw.name] = {**results["targets"].get(gw.name, {}), "kind": "gateway",
                                           "error": f"{e!r}\n{gw.log_tail(15) if gw.log_path else ''}"}
            log(f"[{gw.name}] FAILED: {e!r}")
        finally:
            try:
                await asyncio.wait_for(gw.delete_all(), 60)
            except Exception:
                pass
            gw.stop()
            if gw.log_path is not None:
                results["targets"][gw.name]["log"] = str(gw.log_path)
    return results


def main(argv=None):
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="kgbench-"))
    setup_isolated_env(tmp, args.kernel_python)
    try:
        results = asyncio.run(amain(args, tmp))
        report(results, args)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
            print(f"\nwrote {args.json}")
    finally:
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    failed = [n for n, t in results["targets"].items() if t.get("error")]
    incomplete = [f"{n} {k}" for n, t in results["targets"].items() for k, fl in t.get("flood", {}).items()
                  if not fl.get("all_complete")]
    if incomplete:
        print(f"\nflood incomplete (dropped messages or no idle): {', '.join(incomplete)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
