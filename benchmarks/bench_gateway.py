#!/usr/bin/env python
"""Benchmark the kernel gateway against jupyter_client talking straight to a kernel over ZMQ.

One run starts everything it needs (an isolated kernelspec and runtime dir, our gateway
as a subprocess, optionally Jupyter Kernel Gateway 3.0 as a peer) and measures:

1. execute round trip (until execute_reply AND iopub idle): median / p99,
   gateway over websocket (legacy JSON and v1 binary) vs direct ZMQ;
2. output flood: one cell emitting exactly N iopub stream messages: delivered count,
   final idle, time to idle;
   both with and without CurveZMQ transport encryption of the kernel's channels
   (``--encryption both``, the default: paths named ``...+curve`` run on a kernelspec
   declaring ``supported_encryption: ["curve"]``, direct ones with jupyter_client's own);
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


#: Kernelspec of the encrypted paths: the same kernel, declaring CurveZMQ support.
CURVE_SPEC = "python3-curve"
CURVE = "+curve"  # suffix of the encrypted paths' names


def setup_isolated_env(tmp: Path, kernel_python: str) -> dict:
    """Private kernelspecs ``python3`` and ``python3-curve`` (absolute interpreter; the second declares CurveZMQ
    support, so it is encrypted) + runtime/config dirs for every path."""
    for name, metadata in (("python3", {}), (CURVE_SPEC, {"supported_encryption": ["curve"]})):
        kdir = tmp / "share" / "jupyter" / "kernels" / name
        kdir.mkdir(parents=True)
        (kdir / "kernel.json").write_text(json.dumps({
            "argv": [kernel_python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python 3 (bench{', encrypted' if metadata else ''})", "language": "python",
            "metadata": metadata}))
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

    async def create_kernel(self, timeout, name=None):
        r = await self.fetch("POST", "/api/kernels", {"name": name}, timeout)
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
# kernel starts
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


async def gw_start_once(gw: Gateway, args, keep=False, protocol=None, kernel_name=None):
    """POST /api/kernels, open the websocket, first kernel_info_reply.  Returns (record, kid, ws)."""
    t0 = perf()
    kid = await gw.create_kernel(args.start_timeout, kernel_name)
    t1 = perf()
    ws = KernelWebSocket(protocol or args.start_protocol)
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


async def direct_start_once(args, keep=False, curve=False):
    """AsyncKernelManager.start_kernel, client channels, first kernel_info_reply. ``curve``: the encrypted spec,
    with jupyter_client's own transport encryption."""
    from jupyter_client.manager import AsyncKernelManager

    t0 = perf()
    km = (AsyncKernelManager(kernel_name=CURVE_SPEC, transport_encryption="required") if curve
          else AsyncKernelManager(kernel_name="python3"))
    await km.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t1 = perf()
    kc = km.client()
    kc.start_channels()
    await direct_kernel_info(kc, args.start_timeout)
    t2 = perf()
    rec = {"total_s": t2 - t0, "launch_s": t1 - t0, "kernel_info_s": t2 - t1}
    if keep:
        return rec, km, kc
    t3 = perf()
    await direct_stop(km, kc)
    rec["delete_s"] = perf() - t3
    return rec, None, None


async def direct_stop(km, kc):
    try:
        kc.stop_channels()
    finally:
        await km.shutdown_kernel(now=True)


def kernel_pid(km):
    prov = getattr(km, "provisioner", None)
    return getattr(prov, "pid", None) or getattr(getattr(prov, "process", None), "pid", None)


# ----------------------------------------------------------------------------------------------
# execution paths: each runs one execute_request and reports when reply + idle arrived
# ----------------------------------------------------------------------------------------------
def _mid(msg):
    return (msg.get("parent_header") or {}).get("msg_id")


_DELIM = b"<IDS|MSG>"


class DirectPath:
    """jupyter_client AsyncKernelClient straight to the kernel.

    ``raw=False``: the public API (``kc.execute`` + ``get_msg`` = full deserialize, HMAC check,
    date parsing per message).  ``raw=True``: the same sockets, ``recv_multipart`` and only the
    header/parent decoded, i.e. about what a lean proxy has to do per message.
    """

    def __init__(self, name, target, km, kc, raw):
        self.name, self.target, self.km, self.kc, self.raw = name, target, km, kc, raw
        pid = kernel_pid(km)
        self.meter = CpuMeter(kernel_pids=[pid] if pid else [])

    async def execute(self, code, timeout, quiet):
        return await (self._raw if self.raw else self._api)(code, timeout, quiet)

    async def _api(self, code, timeout, quiet):
        kc = self.kc
        t0 = perf()
        msg_id = kc.execute(code, store_history=False)
        deadline = t0 + timeout
        stdout = other = 0
        t_idle = t_reply = reply = None
        t_last = t0
        while t_idle is None:
            now = perf()
            if now >= deadline:
                break
            try:
                msg = await kc.iopub_channel.get_msg(timeout=min(deadline - now, quiet))
            except queue.Empty:
                if reply is None:  # was the reply already there?
                    try:
                        while reply is None:
                            m = await kc.shell_channel.get_msg(timeout=0.001)
                            if _mid(m) == msg_id:
                                reply, t_reply = m, perf()
                    except queue.Empty:
                        pass
                if reply is not None and perf() - max(t_last, t_reply) > quiet:
                    break  # reply here, iopub silent: the idle status was lost
                continue
            if _mid(msg) != msg_id:
                continue
            t_last = perf()
            mt = msg["msg_type"]
            if mt == "stream":
                if msg["content"].get("name") == "stdout":
                    stdout += 1
                else:
                    other += 1
            elif mt == "status" and msg["content"]["execution_state"] == "idle":
                t_idle = t_last
        while reply is None and perf() < deadline:
            try:
                m = await kc.shell_channel.get_msg(timeout=max(0.001, deadline - perf()))
            except queue.Empty:
                break
            if _mid(m) == msg_id:
                reply, t_reply = m, perf()
        return _result(t0, t_reply, t_idle, stdout, other, (reply or {}).get("content", {}).get("status"))

    async def _raw(self, code, timeout, quiet):
        import zmq

        loads = json.loads
        kc = self.kc
        iopub, shell = kc.iopub_channel.socket, kc.shell_channel.socket
        t0 = perf()
        msg_id = kc.execute(code, store_history=False)
        deadline = t0 + timeout
        stdout = other = 0
        t_idle = t_reply = status = None
        t_last = t0

        async def poll_reply(wait_ms):
            nonlocal t_reply, status
            while t_reply is None and await shell.poll(wait_ms):
                frames = await shell.recv_multipart()
                i = frames.index(_DELIM)
                if loads(frames[i + 3]).get("msg_id") == msg_id:
                    t_reply = perf()
                    status = loads(frames[i + 5]).get("status")

        while t_idle is None:
            try:
                frames = await iopub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                now = perf()
                if now >= deadline:
                    break
                if not await iopub.poll(int(min(deadline - now, quiet) * 1000) + 1):
                    await poll_reply(0)
                    if t_reply is not None and perf() - max(t_last, t_reply) > quiet:
                        break
                continue
            i = frames.index(_DELIM)
            if loads(frames[i + 3]).get("msg_id") != msg_id:
                continue
            t_last = perf()
            mt = loads(frames[i + 2])["msg_type"]
            if mt == "stream":
                if loads(frames[i + 5]).get("name") == "stdout":
                    stdout += 1
                else:
                    other += 1
            elif mt == "status" and loads(frames[i + 5])["execution_state"] == "idle":
                t_idle = t_last
        if t_reply is None:
            await poll_reply(int(max(0.0, deadline - perf()) * 1000) + 1)
        return _result(t0, t_reply, t_idle, stdout, other, status)

    async def close(self):
        pass


class WsPath:
    """A websocket (legacy JSON or v1 binary) through a gateway, one kernel of its own."""

    def __init__(self, name, target, gw, kid, ws, kernel_pids):
        self.name, self.target, self.gw, self.kid, self.ws = name, target, gw, kid, ws
        self.meter = CpuMeter(gateway_pid=gw.proc.pid, kernel_pids=kernel_pids)

    async def execute(self, code, timeout, quiet):
        t0 = perf()
        p = self.ws.execute(code)
        await self.ws.settle(p, timeout, quiet)
        return _result(t0, p.t_reply, p.t_idle, p.streams, p.other_streams, (p.reply or {}).get("status"))

    async def close(self):
        self.ws.close()
        await self.gw.delete_kernel(self.kid)


def _result(t0, t_reply, t_idle, stdout, other, status):
    done = t_reply is not None and t_idle is not None
    end = max(t_reply, t_idle) if done else perf()
    return {"t0": t0, "end": end, "elapsed_s": end - t0, "complete": done, "idle": t_idle is not None,
            "reply": status, "stdout": stdout, "other": other}


async def open_paths(targets, args):
    """One kernel for the direct paths (zmq API + raw share it), one kernel per gateway protocol; each once per
    encryption variant (``--encryption``)."""
    paths = []
    for name, t in targets.items():
        for curve in args.variants:
            suffix = CURVE if curve else ""
            if t["kind"] == "direct":
                _, km, kc = await direct_start_once(args, keep=True, curve=curve)
                paths.append(DirectPath(f"direct zmq{suffix}", name, km, kc, raw=False))
                if args.raw:
                    paths.append(DirectPath(f"direct zmq-raw{suffix}", name, km, kc, raw=True))
                t.setdefault("_kernels", []).append((km, kc))
                continue
            gw = t["_gw"]
            for proto in args.protocols:
                key = f"ws-{'json' if proto == 'legacy' else 'v1'}{suffix}"
                before = set(ps.descendants(gw.proc.pid))
                try:
                    _, kid, ws = await gw_start_once(gw, args, keep=True, protocol=proto,
                                                     kernel_name=CURVE_SPEC if curve else None)
                except Exception as e:  # e.g. v1 not offered by the server
                    t["res"].setdefault("errors", {})[key] = repr(e)
                    log(f"[{name}] {key}: {e!r}")
                    continue
                kpids = sorted(set(ps.descendants(gw.proc.pid)) - before)
                gw.remember_children()
                t["res"].setdefault("client_tcp_nodelay", ws.nodelay())
                paths.append(WsPath(f"{name} {key}", name, gw, kid, ws, kpids))
    return paths


async def close_paths(paths, targets):
    for p in paths:
        try:
            await p.close()
        except Exception as e:
            log(f"  close {p.name}: {e!r}")
    for t in targets.values():
        for km, kc in t.pop("_kernels", []):
            await direct_stop(km, kc)


async def bench_round_trips(paths, args, results):
    """Interleaved: blocks of ``--block`` iterations per path, round robin, so background load
    hits all paths alike."""
    for p in paths:
        for _ in range(args.warmup):
            await p.execute(args.code, args.timeout, args.timeout)
    times = {p.name: [] for p in paths}
    errors = {p.name: 0 for p in paths}
    cpu = {p.name: [0.0, 0.0, 0.0] for p in paths}
    done = 0
    while done < args.iterations:
        n = min(args.block, args.iterations - done)
        for p in paths:
            with p.meter:
                for _ in range(n):
                    r = await p.execute(args.code, args.timeout, args.timeout)
                    if not r["complete"] or r["reply"] != "ok":
                        errors[p.name] += 1
                        continue
                    times[p.name].append(r["elapsed_s"])
            c = cpu[p.name]
            c[0] += p.meter.gateway
            c[1] += p.meter.kernel
            c[2] += p.meter.client
        done += n
    for p in paths:
        it = max(1, len(times[p.name]))
        d = {**summarize(times[p.name]), "errors": errors[p.name],
             "kernel_cpu_s": cpu[p.name][1] / it, "client_cpu_s": cpu[p.name][2] / it}
        if isinstance(p, WsPath):
            d["gateway_cpu_s"] = cpu[p.name][0] / it
        results[p.target].setdefault("rt", {})[p.name.split(" ", 1)[1]] = d


async def bench_flood(paths, args, results):
    code = FLOOD_CODE.format(n=args.flood)
    runs = {p.name: [] for p in paths}
    broken = set()
    for rep in range(args.flood_repeats):
        for p in paths:
            if p.name in broken:
                continue
            log(f"  flood {rep + 1}/{args.flood_repeats} {p.name}")
            with p.meter:
                r = await p.execute(code, args.flood_timeout, args.flood_quiet)
            run = {"delivered": r["stdout"], "other_streams": r["other"], "idle": r["idle"], "reply": r["reply"],
                   "complete": r["complete"] and r["stdout"] == args.flood, "time_to_idle_s": r["elapsed_s"],
                   "msgs_per_s": r["stdout"] / r["elapsed_s"], "kernel_cpu_s": p.meter.kernel,
                   "client_cpu_s": p.meter.client}
            if isinstance(p, WsPath):
                run["gateway_cpu_s"] = p.meter.gateway
                run["gateway_rss_mb_after"] = (ps.rss_kb(p.gw.proc.pid) or 0) / 1024
            runs[p.name].append(run)
            if not r["idle"]:
                # the kernel may still be busy / output still queued: settle before the next path runs
                await asyncio.sleep(1.0)
                if r["reply"] is None:
                    broken.add(p.name)
            await asyncio.sleep(0.3)
    for p in paths:
        rs = runs[p.name]
        if not rs:
            continue
        med = sorted(rs, key=lambda r: r["time_to_idle_s"])[len(rs) // 2]
        results[p.target].setdefault("flood", {})[p.name.split(" ", 1)[1]] = {
            **med, "all_complete": all(r["complete"] for r in rs), "runs": rs}


async def bench_starts(targets, args):
    """Warm-up once per target, then ``--starts`` rounds, round robin over targets."""
    recs = {name: [] for name in targets}
    for rnd in range(args.starts + 1):
        for name, t in targets.items():
            if t["kind"] == "direct":
                rec = (await direct_start_once(args))[0]
            else:
                rec = (await gw_start_once(t["_gw"], args))[0]
            if rnd:
                recs[name].append(rec)
    for name, rs in recs.items():
        targets[name]["res"]["start"] = {**{k: statistics.median(r[k] for r in rs) for k in rs[0]},
                                         "n": len(rs), "all_s": [r["total_s"] for r in rs]}


async def bench_concurrent(name, t, args):
    n = args.concurrent
    res = t["res"]
    log(f"[{name}] {n} concurrent kernel starts")
    if t["kind"] == "direct":
        t0 = perf()
        out = await asyncio.wait_for(asyncio.gather(*(direct_start_once(args, keep=True) for _ in range(n))),
                                     args.start_timeout * 2)
        wall = perf() - t0
        await asyncio.sleep(1.0)
        kern_rss = [ps.rss_kb(p) or 0 for p in (kernel_pid(km) for _, km, _ in out) if p]
        t1 = perf()
        await asyncio.gather(*(direct_stop(km, kc) for _, km, kc in out))
        res["concurrent"] = {"n": n, "wall_s": wall, "median_s": statistics.median(r["total_s"] for r, _, _ in out),
                             "max_s": max(r["total_s"] for r, _, _ in out), "delete_all_s": perf() - t1}
        res["mem"] = {"kernel_rss_per_kernel_mb": sum(kern_rss) / 1024 / max(1, len(kern_rss))}
        return
    gw = t["_gw"]
    await asyncio.sleep(1.0)
    rss0, _, _ = ps.tree_rss_kb(gw.proc.pid)
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
    rss2, _, _ = ps.tree_rss_kb(gw.proc.pid)
    t1 = perf()
    await asyncio.gather(*(gw.delete_kernel(kid) for _, kid, _ in out))
    del_wall = perf() - t1
    await asyncio.sleep(1.0)
    rss3, _, nk3 = ps.tree_rss_kb(gw.proc.pid)
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


def run_meta(args) -> dict:
    """The ``meta`` block of a benchmark's results: when, where, the load at the start, and its arguments."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": sys.version.split()[0],
            "platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
            "args": json.loads(json.dumps(vars(args), default=str))}


def guarded(results: dict, body) -> int:
    """Run a benchmark's ``body()``; its exit status: 0, 130 when interrupted, 1 when it failed (the reason goes to
    ``results["meta"]["error"]``, and the figures measured so far are still reported)."""
    try:
        body()
        return 0
    except (KeyboardInterrupt, Exception) as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        results["meta"]["error"] = "interrupted" if interrupted else f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {results['meta']['error']}")
        return 130 if interrupted else 1


def end_run(results: dict, report, json_path: Path | None) -> None:
    """Note the load at the end, print the report (``report()``), and write every figure as JSON when asked."""
    results["meta"]["loadavg_end"] = os.getloadavg()
    report()
    if json_path:
        json_path.write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {json_path}")


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
    meta = results["meta"]
    print(f"\nkernel gateway benchmark {meta['time']}  cpus={meta['cpus']}  "
          f"loadavg start={'/'.join(f'{x:.1f}' for x in meta['loadavg_start'])} "
          f"end={'/'.join(f'{x:.1f}' for x in meta.get('loadavg_end', ()))}  {meta.get('versions', '')}")
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
    dfl_t = dfl.get("time_to_idle_s") if dfl.get("all_complete") else None
    dfr_t = dfr.get("time_to_idle_s") if dfr.get("all_complete") else None
    rows = []
    for name, t in targets.items():
        for key, r in t.get("flood", {}).items():
            rows.append([f"{name} {key}", f"{f(r.get('delivered'))}/{args.flood}", r.get("idle"),
                         r.get("all_complete"), r.get("time_to_idle_s"), (r.get("msgs_per_s") or 0) / 1000,
                         ratio(r.get("time_to_idle_s"), dfl_t), ratio(r.get("time_to_idle_s"), dfr_t),
                         r.get("gateway_cpu_s"), r.get("kernel_cpu_s"), r.get("client_cpu_s"), r.get("other_streams")])
    if rows:
        table(f"output flood: {args.flood} stream msgs in one cell, median of {args.flood_repeats} runs (s)",
              ["path", "delivered", "idle", "all runs ok", "to idle", "kmsg/s", "x direct", "x raw", "gw cpu",
               "kern cpu", "client cpu", "stderr msgs"], rows)
        print("  (x direct / x raw only against a baseline that delivered everything; "
              "'to idle' of an incomplete run = until the reply and iopub went quiet)")

    encryption_report(targets, args)

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
    for name, err in (meta.get("section_errors") or {}).items():
        print(f"\n!! section {name}: {err}")
    for name, t in targets.items():
        if t.get("error"):
            print(f"\n!! {name}: {t['error']}")
        for k, e in (t.get("errors") or {}).items():
            print(f"\n!! {name} {k}: {e}")


def _encrypted(targets, section):
    """(path name, its figures, the same path's unencrypted figures) of every encrypted path in ``section``."""
    for name, t in targets.items():
        for key, r in t.get(section, {}).items():
            if key.endswith(CURVE):
                yield f"{name} {key}", r, t[section].get(key[: -len(CURVE)], {})


def encryption_report(targets, args):
    """Each encrypted path against the same path unencrypted and against direct ZMQ encrypted (the goal: a round
    trip at most 1.25 x direct, a flood with nothing lost)."""
    direct = targets.get("direct", {})
    drt = direct.get("rt", {}).get("zmq" + CURVE, {})
    drt_plain = direct.get("rt", {}).get("zmq", {})
    rows = [[path, r.get("median_ms"), plain.get("median_ms"), ratio(r.get("median_ms"), plain.get("median_ms")),
             ratio(r.get("median_ms"), drt.get("median_ms")), ratio(r.get("median_ms"), drt_plain.get("median_ms")),
             r.get("p99_ms"), ratio(r.get("p99_ms"), drt.get("p99_ms")), r.get("errors")]
            for path, r, plain in _encrypted(targets, "rt")]
    if rows:
        table("transport encryption: round trip (ms), encrypted vs the same path unencrypted, vs direct zmq encrypted "
              "and vs direct zmq unencrypted",
              ["path", "median", "unencrypted", "x unencrypted", "x direct+curve med", "x direct med", "p99",
               "x direct+curve p99", "errors"], rows)
    rows = [[path, f"{f(r.get('delivered'))}/{args.flood}",
             max(args.flood - min(run["delivered"] for run in r["runs"]), 0) if r.get("runs") else None,
             r.get("all_complete"), r.get("time_to_idle_s"), plain.get("time_to_idle_s"),
             ratio(r.get("time_to_idle_s"), plain.get("time_to_idle_s"))]
            for path, r, plain in _encrypted(targets, "flood")]
    if rows:
        table(f"transport encryption: flood of {args.flood} msgs, median of {args.flood_repeats} runs (s)",
              ["path", "delivered", "lost (worst run)", "all runs ok", "to idle", "unencrypted", "x unencrypted"], rows)


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
    ap.add_argument("--encryption", default="both", choices=["off", "on", "both"],
                    help="round trips and floods without CurveZMQ transport encryption, with it, or both")
    ap.add_argument("--block", type=int, default=25, help="round-trip iterations per path before switching")
    ap.add_argument("--timeout", type=float, default=30.0, help="per request")
    ap.add_argument("--flood-timeout", type=float, default=180.0)
    ap.add_argument("--flood-quiet", type=float, default=5.0,
                    help="flood: give up waiting for idle once the reply arrived and iopub was silent this long")
    ap.add_argument("--start-timeout", type=float, default=120.0)
    ap.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    ap.add_argument("--json", type=Path, help="write all results to this file")
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--strict", action="store_true",
                    help="exit 2 if a gateway path dropped flood output, lost the idle, or had round-trip errors")
    args = ap.parse_args(argv)
    if args.quick:
        args.iterations, args.warmup, args.flood, args.flood_repeats = 30, 5, 2000, 1
        args.starts, args.concurrent = 1, 3
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    args.variants = {"off": [False], "on": [True], "both": [False, True]}[args.encryption]
    return args


async def amain(args, tmp: Path) -> dict:
    from tornado.httpclient import AsyncHTTPClient

    AsyncHTTPClient.configure(None, max_clients=64)
    meta = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": sys.version.split()[0],
            "platform": platform.platform(), "cpus": os.cpu_count(), "kernel_python": args.kernel_python,
            "loadavg_start": os.getloadavg(),
            "args": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items()}}
    try:
        import ipykernel
        import jupyter_client
        import tornado
        import zmq
        meta["versions"] = {"jupyter_client": jupyter_client.__version__, "ipykernel": ipykernel.__version__,
                            "tornado": tornado.version, "pyzmq": zmq.__version__}
    except Exception:
        pass

    targets: dict[str, dict] = {}
    if not args.no_direct:
        targets["direct"] = {"kind": "direct", "res": {"kind": "direct"}}
    gateways = []
    if not args.no_gateway:
        pp = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        gateways.append(Gateway(args.gateway_name, args.gateway_cmd, tmp, args.gateway_arg,
                                {"PYTHONPATH": os.pathsep.join(pp)}))
    for peer in args.peer:
        if peer == "kg":
            venv = ensure_peer_venv(args.peer_venv.resolve())
            gateways.append(Gateway("kg", KG_CMD, tmp, args.peer_arg, {"PYTHONPATH": ""}, venv=venv))

    failed = {}
    try:
        for gw in gateways:
            res = {"kind": "gateway", "cmd": gw.cmd, "extra_args": gw.extra_args}
            log(f"[{gw.name}] starting: {gw.cmd} {' '.join(gw.extra_args)}")
            try:
                res["ready_s"] = gw.start(args.start_timeout)
            except Exception as e:
                failed[gw.name] = {**res, "error": str(e)}
                log(f"[{gw.name}] FAILED to start: {e}")
                continue
            res["pid"] = gw.proc.pid
            await asyncio.sleep(0.5)
            rss, kids_rss, nkids = ps.tree_rss_kb(gw.proc.pid)
            res["mem_startup"] = {"gateway_rss_mb": rss / 1024, "children_rss_mb": kids_rss / 1024,
                                  "children": nkids}
            log(f"[{gw.name}] ready in {res['ready_s']:.2f}s, rss {rss / 1024:.1f} MB")
            targets[gw.name] = {"kind": "gateway", "res": res, "_gw": gw}

        async def section(name, coro):
            try:
                await coro
            except Exception as e:
                log(f"[{name}] FAILED: {e!r}")
                meta.setdefault("section_errors", {})[name] = repr(e)

        if "start" in args.sections:
            log(f"[all] kernel starts: {args.starts} rounds (+1 warm-up), round robin")
            await section("start", bench_starts(targets, args))
        if args.sections & {"rt", "flood"}:
            paths = []
            try:
                paths = await open_paths(targets, args)
                if "rt" in args.sections:
                    log(f"[all] round trips: {args.iterations} x {len(paths)} paths, blocks of {args.block}")
                    await section("rt", bench_round_trips(paths, args, {n: t["res"] for n, t in targets.items()}))
                if "flood" in args.sections:
                    log(f"[all] flood: {args.flood} msgs x {args.flood_repeats} x {len(paths)} paths")
                    await section("flood", bench_flood(paths, args, {n: t["res"] for n, t in targets.items()}))
                for p in paths:
                    if isinstance(p, WsPath):
                        targets[p.target]["res"].setdefault("ws_unmatched", {})[p.name] = p.ws.unmatched
            finally:
                await close_paths(paths, targets)
        if "concurrent" in args.sections:
            for name, t in targets.items():
                await section(f"{name} concurrent", bench_concurrent(name, t, args))
    finally:
        for gw in gateways:
            try:
                await asyncio.wait_for(gw.delete_all(), 60)
            except Exception:
                pass
            gw.stop()
            if gw.name in targets:
                targets[gw.name]["res"]["log_tail"] = gw.log_tail(5)
    meta["loadavg_end"] = os.getloadavg()
    out = {name: t["res"] for name, t in targets.items()}
    out.update(failed)
    return {"meta": meta, "targets": out}


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
    failed += list(results["meta"].get("section_errors") or ())
    incomplete = [f"{n} {k}" for n, t in results["targets"].items() for k, fl in t.get("flood", {}).items()
                  if not fl.get("all_complete")]
    if incomplete:
        print(f"\nflood incomplete (dropped messages or no idle): {', '.join(incomplete)}")
    if failed:
        return 1
    if args.strict:
        bad = [i for i in incomplete if not i.startswith("direct ")]
        bad += [f"{n} {k} errors" for n, t in results["targets"].items() if t.get("kind") == "gateway"
                for k, r in t.get("rt", {}).items() if r.get("errors")]
        if bad:
            print(f"strict: failing for {', '.join(bad)}")
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
