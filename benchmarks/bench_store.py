#!/usr/bin/env python
"""Kernel store figures: kernels that outlive the gateway, failover between replicas, and the store's write rate.

    python benchmarks/bench_store.py [--sections restart,failover,writes] [--kernels 0,20,100] [--json out.json]

Starts everything itself on loopback and removes it on exit, also after a failure, Ctrl-C or SIGTERM (kernels
deleted over the API, gateways, jupyter_server, haproxy and PostgreSQL stopped, then any process whose command
line names this run's temp dir killed by pid). Sections:

1. ``restart`` (SQLite store): a gateway with ``GATEWAY_KERNELS_ON_STOP=keep`` holds N local kernels (0, then
   20, then 100: kernels are added, ``--batch`` started at once), each with a variable set; SIGTERM (the stop time
   is measured: signal to exit); a new gateway on the same port and store; from its process start to (a)
   ``/readyz`` 200 and (b) every kernel answering ``print(kept)`` with its own value, over one websocket per
   kernel, all at once, opened once ready. ``--restarts`` times per N. Baseline in the same run: a fresh
   gateway's start to ``/readyz`` with an empty, new store (``--baseline`` times).
2. ``failover``: two replicas on PostgreSQL behind haproxy (round robin, tests/services/haproxy.py), a
   jupyter_server in gateway mode pointed at haproxy with ``--notebooks`` notebook sessions; over the first
   notebook's websocket, ``--kills`` times, alternating replicas: SIGKILL one, time until the next execute
   succeeds, start it again. Then: every kernel listed by both replicas and answering (kernels lost).
3. ``writes``: two replicas on PostgreSQL; what PostgreSQL saw written per second: write statements per table
   (its own log, ``log_statement = 'mod'``), rows per table (``pg_stat_user_tables`` n_tup_ins + n_tup_upd +
   n_tup_del) and transactions (``pg_stat_database.xact_commit``, reads too) over ``--window`` seconds with 0
   kernels, ``--busy-kernels`` idle kernels, and the same kernels each printing in a loop (one stream message
   per print) streamed to a websocket client.
   Activity is written once per replica per sync interval, in one batch, so the rate must not follow the
   message rate.

Needs root for PostgreSQL (run as the ``postgres`` user) and Debian's ``haproxy``/``postgresql`` (installed
with apt when missing, as in the tests). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from bench_gateway import end_run, guarded, log, run_meta, table  # noqa: E402
from bench_yarn import _sigterm  # noqa: E402  (SIGTERM raises KeyboardInterrupt: the same cleanup as Ctrl-C)

from tests.api.helpers import pgrep_f  # noqa: E402
from tests.e2e.conftest import start_jupyter_server  # noqa: E402
from tests.e2e.kernel_ws import KernelWebSocket  # noqa: E402
from tests.integration.replicas.test_replicas import TOKEN, Replicas, _next_execute_seconds  # noqa: E402
from tests.services.client import KernelWS, call, start_kernel  # noqa: E402
from tests.services.gateway import GatewayServer, free_port, start_gateway, wait_until  # noqa: E402
from tests.services.haproxy import start_haproxy  # noqa: E402
from tests.services.postgres import start_postgres  # noqa: E402

perf = time.perf_counter
SECTIONS = ("restart", "failover", "writes")


class Cleanup:
    """What to undo, last first, each step on its own so that one failure does not skip the rest."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], Any]]] = []

    def push(self, what: str, step: Callable[[], Any]) -> None:
        self.steps.append((what, step))

    def run(self) -> None:
        while self.steps:
            what, step = self.steps.pop()
            try:
                step()
            except Exception as exc:  # cleanup goes on; the sweep by temp dir kills what is left
                log(f"  cleanup {what}: {type(exc).__name__}: {exc}")


def delete_kernels(gw: GatewayServer, ids: list[str] | None = None) -> None:
    """DELETE the given kernels (default: every kernel the gateway lists), ten at a time."""
    if gw.proc.poll() is not None:
        return
    if ids is None:
        status, body, _ = call(gw, "GET", "/api/kernels", timeout=60)
        ids = [k["id"] for k in body] if status == 200 else []
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda kid: call(gw, "DELETE", f"/api/kernels/{kid}", timeout=120), ids))


def sweep(tmp: Path) -> list[int]:
    """Kill (by pid) every process whose command line names this run's temp dir: kernels, gateways left over."""
    pids = [p for p in pgrep_f(str(tmp)) if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def store_key(path: Path) -> Path:
    path.write_text(base64.b64encode(os.urandom(32)).decode())
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------------------------------------------------------
# 1. restart to serving (SQLite)
# ---------------------------------------------------------------------------------------------------------------
class KeepingGateway:
    """A gateway that keeps its kernels in a SQLite store under ``root``, started again and again on one port."""

    def __init__(self, root: Path, cleanup: Cleanup) -> None:
        root.mkdir(parents=True)
        self.root = root
        self.env = {"GATEWAY_KERNELS_ON_STOP": "keep", "GATEWAY_KERNEL_STORE_KEY_FILE": str(store_key(root / "key")),
                    "GATEWAY_KERNEL_STORE_PATH": str(root / "kernels.sqlite"),
                    "JUPYTER_RUNTIME_DIR": str(root / "runtime")}
        self.port = free_port()
        self.runs = 0
        self.gw: GatewayServer | None = None
        self.kernels: list[str] = []
        cleanup.push(f"gateway in {root}", self.remove)

    def start(self, timeout: float = 600) -> float:
        """Start a gateway; seconds from just before its process start until ``/readyz`` answered 200."""
        self.runs += 1
        workdir = self.root / f"run-{self.runs}"  # its own log, kept for the re-attach line
        workdir.mkdir()
        t0 = perf()
        self.gw = start_gateway(tmp_path=workdir, env=self.env, port=self.port, timeout=timeout)
        self.started_at = t0
        return perf() - t0

    def stop(self) -> float:
        """SIGTERM; seconds until the process exited."""
        assert self.gw is not None
        t0 = perf()
        code = self.gw.stop(signal.SIGTERM, timeout=300)
        seconds = perf() - t0
        if code != 0:
            raise RuntimeError(f"the keeping gateway exited with {code}:\n{self.gw.log()[-3000:]}")
        return seconds

    def reattach_seconds(self) -> float | None:
        """What the gateway logged for its re-attach of the kept kernels."""
        found = re.search(r"re-attached (\d+) of (\d+) kept kernels in ([\d.]+)s", self.gw.log() if self.gw else "")
        return float(found.group(3)) if found else None

    def add_kernels(self, count: int, batch: int) -> list[str]:
        """Start ``count`` kernels, ``batch`` at once, each with ``kept`` set to its id; return the errors."""
        def one(_: int) -> str:
            kid = start_kernel(self.gw, timeout=600)
            self.kernels.append(kid)
            with KernelWS(self.gw, kid, timeout=120) as ws:
                out, _msgs = ws.run(f"kept = {kid!r}; print('set')", timeout=300)
            if out.strip() != "set":
                raise RuntimeError(f"kernel {kid} did not run its first cell: {out!r}")
            return kid

        errors: list[str] = []
        t0 = perf()
        with ThreadPoolExecutor(batch) as pool:
            futures = [pool.submit(one, i) for i in range(count)]
            for future in futures:
                try:
                    future.result()
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        log(f"  {count - len(errors)} kernels started in {perf() - t0:.1f}s ({batch} at once); now {len(self.kernels)}"
            + (f"; {len(errors)} failed: {errors[:3]}" if errors else ""))
        return errors

    def answer_all(self) -> list[float]:
        """Every kernel runs ``print(kept)`` over its own websocket, all at once; seconds from the process start."""
        def one(kid: str) -> float:
            with KernelWS(self.gw, kid, timeout=300) as ws:
                out, _msgs = ws.run("print(kept)", timeout=600)
            if out.strip() != kid:
                raise RuntimeError(f"kernel {kid} answered {out!r}, not its own id: its variables were lost")
            return perf() - self.started_at

        if not self.kernels:
            return []
        with ThreadPoolExecutor(len(self.kernels)) as pool:
            return list(pool.map(one, self.kernels))

    def remove(self) -> None:
        if self.gw is not None and self.gw.proc.poll() is None:
            delete_kernels(self.gw, list(self.kernels))
            self.gw.stop(signal.SIGTERM, timeout=120)


def run_restart(args: argparse.Namespace, tmp: Path, results: dict[str, Any], cleanup: Cleanup) -> None:
    section: dict[str, Any] = {"baseline": [], "rows": []}
    results["restart"] = section
    log("== restart: fresh gateways on an empty store (baseline)")
    warmup = KeepingGateway(tmp / "warm-up", cleanup)  # not counted: the first start reads cold files
    warmup.start()
    warmup.stop()
    for i in range(args.baseline):
        fresh = KeepingGateway(tmp / f"fresh-{i}", cleanup)
        ready = fresh.start()
        stop = fresh.stop()
        section["baseline"].append({"ready_s": ready, "stop_s": stop})
        log(f"  fresh {i + 1}: ready {ready:.2f}s, stop {stop:.2f}s")
    keeping = KeepingGateway(tmp / "keeping", cleanup)
    keeping.start()
    for n in args.kernels:
        if n > len(keeping.kernels):
            log(f"== restart: starting {n - len(keeping.kernels)} kernels")
            errors = keeping.add_kernels(n - len(keeping.kernels), args.batch)
            if errors:
                section.setdefault("start_errors", {})[str(n)] = errors
        held = len(keeping.kernels)
        for r in range(args.restarts):
            stop = keeping.stop()
            ready = keeping.start()
            answers = keeping.answer_all()
            row = {"asked": n, "kernels": held, "stop_s": stop, "ready_s": ready,
                   "reattach_logged_s": keeping.reattach_seconds(),
                   "all_answered_s": max(answers) if answers else ready,
                   "first_answer_s": min(answers) if answers else None,
                   "median_answer_s": statistics.median(answers) if answers else None,
                   "load1": os.getloadavg()[0]}
            section["rows"].append(row)
            log(f"  N={held} restart {r + 1}: stop {stop:.2f}s, ready {ready:.2f}s, all answered "
                f"{row['all_answered_s']:.2f}s (re-attach logged {row['reattach_logged_s']})")
        if held < n:
            log(f"  only {held} of {n} kernels could be started; larger N not tried")
            break
    keeping.remove()


# ---------------------------------------------------------------------------------------------------------------
# replicas on PostgreSQL (sections 2 and 3)
# ---------------------------------------------------------------------------------------------------------------
def replica_group(root: Path, args: argparse.Namespace, cleanup: Cleanup) -> tuple[Any, Replicas]:
    root.mkdir(parents=True)
    database = start_postgres()
    cleanup.push("postgres", database.remove)
    group = Replicas(root, database.url)
    group.env["GATEWAY_REPLICA_SYNC_INTERVAL"] = str(args.sync_interval)

    def stop_group() -> None:
        for server in group.running.values():
            delete_kernels(server)
        group.stop_all()

    cleanup.push("replicas", stop_group)
    return database, group


def run_failover(args: argparse.Namespace, tmp: Path, results: dict[str, Any], cleanup: Cleanup) -> None:
    root = tmp / "failover"
    _database, replicas = replica_group(root, args, cleanup)
    section: dict[str, Any] = {"kills": [], "sync_interval_s": args.sync_interval}
    results["failover"] = section
    replicas.start(0), replicas.start(1)
    balancer = start_haproxy(replicas.ports, root)
    cleanup.push("haproxy", balancer.stop)
    front = GatewayServer(port=balancer.port, token=TOKEN, proc=balancer.proc, log_path=balancer.log_path)
    server = start_jupyter_server(front, root / "jupyter")
    cleanup.push("jupyter_server", server.stop)
    kernels = []
    for i in range(args.notebooks):
        resp = server.request("POST", "/api/sessions", {"path": f"nb{i}.ipynb", "name": f"nb{i}.ipynb",
                                                         "type": "notebook", "kernel": {"name": "python3"}}, timeout=120)
        if resp.status != 201:
            raise RuntimeError(f"jupyter_server could not start notebook {i}: {resp.status} {resp.body[:500]!r}")
        kernels.append(resp.json()["kernel"]["id"])
    ws = KernelWebSocket(server.ws_url, kernels[0], server.headers, session_id=uuid.uuid4().hex)
    cleanup.push("notebook websocket", ws.close)
    if ws.kernel_info(timeout=60)["content"]["status"] != "ok":
        raise RuntimeError("the notebook's kernel_info failed")
    ws.collect(ws.execute("counter = 0"), timeout=60)
    log(f"== failover: {args.notebooks} notebooks through jupyter_server -> haproxy -> 2 replicas")
    for k in range(args.kills):
        index = k % 2
        victim = replicas.running[index]
        status, model, _ = call(victim, "GET", f"/api/kernels/{kernels[0]}")
        carried = status == 200 and model.get("connections", 0) > 0  # the notebook's websocket goes through it
        killed = perf()
        victim.stop(signal.SIGKILL)
        seconds = _next_execute_seconds(ws, "counter += 1; print('ok')", "ok", killed, timeout=120)
        victim.log_path.rename(victim.log_path.with_name(f"killed-{k + 1}-{victim.log_path.name}"))  # kept
        t0 = perf()
        replicas.start(index)  # back, as a restarted pod would be
        back = perf() - t0
        section["kills"].append({"replica": index, "carried_websocket": carried, "next_execute_s": seconds,
                                 "restart_ready_s": back})
        log(f"  kill {k + 1}: replica {index} (notebook websocket through it: {carried}): next execute after "
            f"{seconds:.2f}s; it was ready again {back:.2f}s after its start")
    counter = ws.collect(ws.execute("print(counter)"), timeout=60).stdout.strip()
    lost = set()
    for gw in replicas.running.values():
        try:
            wait_until(lambda: set(kernels) <= {k["id"] for k in call(gw, "GET", "/api/kernels")[1]}, 60, 0.2,
                       what="every kernel listed")
        except TimeoutError:
            lost |= set(kernels) - {k["id"] for k in call(gw, "GET", "/api/kernels")[1]}
    dropped: list[str] = []  # a websocket the replica closed under a check that then answered on a new one
    for i, kid in enumerate(kernels):
        for attempt in range(3):
            try:
                with KernelWS(replicas.running[i % 2], kid, timeout=60) as kws:
                    if kws.run("print('alive')", timeout=120)[0].strip() == "alive":
                        break
            except Exception as exc:
                log(f"  kernel {kid} through replica {i % 2}, attempt {attempt + 1}: {exc}")
                dropped.append(f"{kid}: {exc}")
        else:
            lost.add(kid)
    section.update({"notebooks": len(kernels), "kernels_lost": len(lost), "counter": counter,
                    "counter_expected_at_least": args.kills, "check_websockets_dropped": dropped})
    ws.close()
    server.stop()
    for kid in kernels:
        call(replicas.running[0], "DELETE", f"/api/kernels/{kid}", timeout=120)


WRITE_STATS = ("SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables "
               "WHERE relname LIKE 'kernel_gateway_%'")
#: a write statement in PostgreSQL's log (log_statement = 'mod'); psycopg 3 sends them as extended-protocol "execute"
WRITE_LOGGED = re.compile(r"LOG:\s+(?:statement|execute [^:]*):\s+(?:INSERT INTO|UPDATE|DELETE FROM)\s+(\w+)")


class PgCounters:
    """What PostgreSQL saw written: statements per table (from its log, with ``log_statement = 'mod'``), rows per
    table (``pg_stat_user_tables``) and transactions committed (``pg_stat_database``, reads included)."""

    def __init__(self, url: str, log_path: Path) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)  # each read its own transaction: a fresh snapshot
        self.log_path = log_path
        self.conn.execute("ALTER SYSTEM SET log_statement = 'mod'")
        self.conn.execute("SELECT pg_reload_conf()")
        # the replicas' next lease renewals show that their sessions log their writes now
        wait_until(lambda: len(self.statements(self.log_path.stat().st_size - 4096 if self.log_path.stat().st_size
                                                > 4096 else 0)[1]) > 0, 60, 0.2, what="PostgreSQL to log writes")

    def statements(self, offset: int) -> tuple[int, list[str]]:
        """The end of the log, and the tables of the write statements logged after ``offset``."""
        with open(self.log_path, "rb") as log_file:
            log_file.seek(offset)
            text = log_file.read().decode(errors="replace")
        return offset + len(text.encode(errors="replace")), WRITE_LOGGED.findall(text)

    def read(self) -> dict[str, Any]:
        counts: dict[str, Any] = {name: ins + upd + dele for name, ins, upd, dele in
                                  self.conn.execute(WRITE_STATS).fetchall()}
        counts["xact_commit"] = self.conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]
        counts["log_offset"] = self.log_path.stat().st_size
        return counts

    def scalar(self, query: str) -> Any:
        return self.conn.execute(query).fetchone()[0]


def window(pg: PgCounters, label: str, seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    before, t0 = pg.read(), perf()
    time.sleep(seconds)  # the measurement window itself, not a synchronisation
    after, elapsed = pg.read(), perf() - t0
    _end, tables = pg.statements(before["log_offset"])
    rows = {name: (after.get(name, 0) - before.get(name, 0)) / elapsed for name in after if name != "log_offset"}
    stmts = {name: tables.count(name) / elapsed for name in sorted(set(tables) | set(rows) - {"xact_commit"})}
    log(f"  {label}: rows {', '.join(f'{k} {v:.2f}/s' for k, v in rows.items())}; "
        f"statements {', '.join(f'{k} {v:.2f}/s' for k, v in stmts.items())}")
    return {"label": label, "window_s": elapsed, "rows_per_s": rows, "statements_per_s": stmts, **(extra or {})}


BUSY_CODE = """\
import time
_end, _n = time.monotonic() + {seconds}, 0
while time.monotonic() < _end:
    _n += 1
    print(_n, flush=True)
    time.sleep({pause})
"""


def run_writes(args: argparse.Namespace, tmp: Path, results: dict[str, Any], cleanup: Cleanup) -> None:
    database, replicas = replica_group(tmp / "writes", args, cleanup)
    a, b = replicas.start(0), replicas.start(1)
    pg = PgCounters(database.url, database.workdir / "postgres.log")
    cleanup.push("psql connection", pg.conn.close)
    section: dict[str, Any] = {"windows": [], "sync_interval_s": args.sync_interval, "kernels": args.busy_kernels}
    results["writes"] = section
    log(f"== writes: 2 replicas on PostgreSQL, sync every {args.sync_interval}s, {args.window}s windows")
    wait_until(lambda: pg.scalar("SELECT count(*) FROM kernel_gateway_leases WHERE name LIKE 'replica:%'") >= 2, 60,
               0.2, what="both replicas' alive leases")
    section["windows"].append(window(pg, "0 kernels", args.window))
    gws = [a, b]
    with ThreadPoolExecutor(args.batch) as pool:
        ids = list(pool.map(lambda i: (gws[i % 2], start_kernel(gws[i % 2], timeout=600)), range(args.busy_kernels)))
    # every kernel's start activity written once (a batch per replica): what follows is the idle steady state
    wait_until(lambda: pg.scalar("SELECT count(*) FROM kernel_gateway_activity") >= len(ids), 120, 0.2,
               what="the kernels' first activity written")
    # ... and counted in the statistics (sessions flush them lazily), so that the idle window starts clean
    wait_until(lambda: pg.scalar("SELECT least(min(n_tup_ins), 1000000) FROM pg_stat_user_tables WHERE relname IN "
                                 "('kernel_gateway_kernels', 'kernel_gateway_activity')") >= len(ids), 60, 0.2,
               what="the statistics to count the kernels' records")
    section["windows"].append(window(pg, f"{len(ids)} idle kernels", args.window))
    duration = args.window + 4 * args.sync_interval + 15
    counts: list[int] = []

    def busy(gw_kid: tuple[GatewayServer, str]) -> int:
        gw, kid = gw_kid
        with KernelWS(gw, kid, timeout=120) as ws:
            _out, msgs = ws.run(BUSY_CODE.format(seconds=duration, pause=args.print_pause), timeout=duration + 300)
        return sum(1 for m in msgs if m["msg_type"] == "stream")

    def all_busy() -> bool:
        states = {}
        for gw in gws:
            states.update({k["id"]: k["execution_state"] for k in call(gw, "GET", "/api/kernels")[1]
                           if k["connections"]})  # the holder's view (a peer's is a record: 'idle')
        return all(states.get(kid) == "busy" for _gw, kid in ids)

    with ThreadPoolExecutor(len(ids)) as pool:
        t_start = perf()
        futures = [pool.submit(busy, pair) for pair in ids]
        wait_until(all_busy, 120, 0.2, what="every kernel busy")
        measured = window(pg, f"{len(ids)} busy kernels", args.window)
        counts = [f.result() for f in futures]
        elapsed = perf() - t_start
    messages = sum(counts)
    measured.update({"stream_messages": messages, "messages_per_s": messages / elapsed})
    section["windows"].append(measured)
    log(f"  {messages} stream messages in {elapsed:.1f}s ({messages / elapsed:.0f}/s) over {len(ids)} websockets")
    for gw, kid in ids:
        call(gw, "DELETE", f"/api/kernels/{kid}", timeout=120)


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def report(results: dict[str, Any]) -> None:
    meta = results["meta"]
    print(f"\nkernel store benchmark {meta['time']}  cpus={meta['cpus']}  loadavg start="
          f"{'/'.join(f'{x:.1f}' for x in meta['loadavg_start'])} end="
          f"{'/'.join(f'{x:.1f}' for x in meta.get('loadavg_end', ()))}"
          + (f"  ERROR: {meta['error']}" if meta.get("error") else ""))
    restart = results.get("restart")
    if restart and restart["baseline"]:
        base = statistics.median(r["ready_s"] for r in restart["baseline"])
        base_stop = statistics.median(r["stop_s"] for r in restart["baseline"])
        rows = [["fresh, empty store (baseline)", "0", base, 1.0, "-", "-", base_stop]]
        for r in restart["rows"]:
            rows.append([f"restart with {r['kernels']} kept", str(r["kernels"]), r["ready_s"], r["ready_s"] / base,
                         r["reattach_logged_s"], r["all_answered_s"], r["stop_s"]])
        table("restart to serving, SQLite store (seconds from the new gateway's process start)",
              ["gateway", "N", "/readyz 200", "x fresh", "re-attach (log)", "all N answered", "stop (SIGTERM)"], rows)
        print(f"baseline: median of {len(restart['baseline'])} fresh starts; 'all N answered': N websockets opened "
              f"at once after /readyz, each ran print(kept) and got its own value back")
        for n, errors in restart.get("start_errors", {}).items():
            print(f"starting kernels for N={n}: {len(errors)} failed, e.g. {errors[0]}")
    failover = results.get("failover")
    if failover and failover["kills"]:
        times = [k["next_execute_s"] for k in failover["kills"]]
        table("failover behind haproxy: SIGKILL of a replica to the notebook's next successful execute",
              ["kill", "replica", "ws through it", "next execute (s)", "its restart to ready (s)"],
              [[str(i + 1), str(k["replica"]), k["carried_websocket"], k["next_execute_s"], k["restart_ready_s"]]
               for i, k in enumerate(failover["kills"])])
        print(f"median {statistics.median(times):.2f}s, max {max(times):.2f}s; kernels lost: "
              f"{failover.get('kernels_lost', '?')} of {failover.get('notebooks', '?')} (each listed by both "
              f"replicas and answering); notebook counter {failover.get('counter')} (>= "
              f"{failover.get('counter_expected_at_least')} expected); sync interval {failover['sync_interval_s']}s")
        for drop in failover.get("check_websockets_dropped", []):
            print(f"  check websocket closed by the replica (answered on a new one): {drop}")
    writes = results.get("writes")
    if writes and writes["windows"]:
        names = sorted({n for w in writes["windows"] for n in w["statements_per_s"]})
        rows = []
        for w in writes["windows"]:
            stmts = sum(w["statements_per_s"].values())
            cells = []
            for n in names:
                cells += [w["statements_per_s"].get(n, 0.0), w["rows_per_s"].get(n, 0.0)]
            rows.append([w["label"], *cells, stmts, w["rows_per_s"]["xact_commit"], w.get("messages_per_s"),
                         (1000 * stmts / w["messages_per_s"]) if w.get("messages_per_s") else None])
        header = ["kernels"]
        for n in names:
            short = n.replace("kernel_gateway_", "")
            header += [f"{short} stmts/s", f"{short} rows/s"]
        table(f"PostgreSQL writes per second, 2 replicas, sync every {writes['sync_interval_s']}s "
              f"({writes['windows'][0]['window_s']:.0f}s windows)",
              header + ["all stmts/s", "xact/s", "stream msgs/s", "stmts per 1000 msgs"], rows)
        print("stmts/s: INSERT/UPDATE/DELETE statements in PostgreSQL's log (log_statement = 'mod'); rows/s: "
              "n_tup_ins + n_tup_upd + n_tup_del (pg_stat_user_tables, flushed by each session at most once a "
              "second, so a window's edges may shift a few rows); xact/s: pg_stat_database.xact_commit, every "
              "query of the replicas, reads included (plus this script's two per window)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--kernels", default="0,20,100", help="restart: kernels held at each step (ascending)")
    ap.add_argument("--batch", type=int, default=10, help="kernels started at once")
    ap.add_argument("--restarts", type=int, default=2, help="restart: restarts measured per N")
    ap.add_argument("--baseline", type=int, default=3, help="restart: fresh starts on an empty store")
    ap.add_argument("--kills", type=int, default=5, help="failover: replicas killed, alternating")
    ap.add_argument("--notebooks", type=int, default=3, help="failover: notebook sessions (kernels)")
    ap.add_argument("--sync-interval", type=float, default=2.0, help="GATEWAY_REPLICA_SYNC_INTERVAL (the default)")
    ap.add_argument("--window", type=float, default=30.0, help="writes: seconds per window")
    ap.add_argument("--busy-kernels", type=int, default=20)
    ap.add_argument("--print-pause", type=float, default=0.01, help="writes: seconds between a busy kernel's prints")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--keep-logs", action="store_true", help="leave the temp dir (gateway, haproxy logs) in place")
    args = ap.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.kernels = sorted(int(n) for n in args.kernels.split(","))
    if set(args.sections) - set(SECTIONS) or not args.sections:
        ap.error(f"--sections takes {', '.join(SECTIONS)}")
    if args.batch < 1 or args.restarts < 1 or args.baseline < 1 or args.kills < 1 or args.notebooks < 1 \
            or args.busy_kernels < 1 or args.window <= 0 or min(args.kernels) < 0:
        ap.error("counts must be at least 1 (--kernels at least 0) and --window above 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)  # a kill runs the same cleanup as Ctrl-C
    results: dict[str, Any] = {"meta": run_meta(args)}
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    cleanup = Cleanup()

    def body() -> None:
        for name in args.sections:
            {"restart": run_restart, "failover": run_failover, "writes": run_writes}[name](args, tmp, results, cleanup)
            cleanup.run()  # each section leaves nothing running for the next

    try:
        status = guarded(results, body)
    finally:
        cleanup.run()
        leftovers = sweep(tmp)
        if leftovers:
            log(f"killed {len(leftovers)} processes left in {tmp}: {leftovers}")
        if args.keep_logs:
            log(f"logs kept in {tmp}")
        else:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    end_run(results, lambda: report(results), args.json)
    return status


if __name__ == "__main__":
    sys.exit(main())
