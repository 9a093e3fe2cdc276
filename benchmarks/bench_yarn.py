#!/usr/bin/env python
"""YARN kernel figures: start-to-ready of native and Spark kernels, and what watching idle kernels costs the RM.

    python benchmarks/bench_yarn.py [--starts 5] [--spark-starts 3] [--window 30] [--quick] [--no-spark] [--json out.json]

Starts everything itself: the YARN test cluster (tests/services/yarn_cluster.py, default ports, 2 nodes;
it waits for the cluster lock while a test session holds it), the ApplicationMaster jar (cached build),
private kernelspecs (``yarn-provisioner`` native mode, ``yarn-spark-provisioner`` spark-submit cluster
mode) in a temp ``JUPYTER_PATH``, and our gateway on loopback whose RM URL is a :class:`CountingProxy`
in front of the RM. Then it measures:

1. start to ready: ``POST /api/kernels`` until the ``kernel_info_reply`` over the websocket, sequential,
   median/min/max, split into "POST returned" and "websocket + kernel_info"; for Spark kernels also the time
   until ``spark.range(10).groupBy().sum()`` answers 45 in the kernel (executors allocated, first job run);
2. RM requests per minute while kernels sit idle, with 0, 1 and 10 native kernels, per request kind, next to
   what one poller per kernel would cost (kernels x 60 / poll interval).

Everything is removed on exit, also on failure and Ctrl-C: kernels deleted, gateway stopped, cluster stopped.
Needs java and mvn on PATH, and pyspark in the venv for the Spark rows (``--no-spark`` skips them).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import _procstat as ps  # noqa: E402
from bench_gateway import end_run, guarded, log, run_meta, table  # noqa: E402

from launchers.yarn import AM_MAIN_CLASS, build_am_jar  # noqa: E402
from tests.integration.yarn.test_yarn_kernels import write_spec  # noqa: E402
from tests.services.client import KernelWS, call, make_msg  # noqa: E402
from tests.services.counting_proxy import CountingProxy  # noqa: E402
from tests.services.gateway import GatewayServer, start_gateway  # noqa: E402
from tests.services.yarn_cluster import YarnCluster, start_cluster  # noqa: E402

perf = time.perf_counter
NATIVE_PORTS = "44200..44299"  # kernel ports in the containers; the YARN tests use 44000..44199
SPARK_PORTS = "44300..44399"
SPARK_SUM = "print(spark.range(10).groupBy().sum().collect()[0][0])"
_APP_ID = re.compile(r"application_\d+_\d+")


class Bench:
    """The gateway under test and the kernels it runs, so that every kernel started is deleted at the end."""

    def __init__(self, gw: GatewayServer) -> None:
        self.gw = gw
        self.live: set[str] = set()

    def start(self, spec: str, timeout: float, spark_sum: bool = False) -> dict[str, Any]:
        """One start: POST, websocket + kernel_info_reply, (Spark) the sum; the kernel stays running."""
        t0 = perf()
        status, body, _ = call(self.gw, "POST", "/api/kernels", {"name": spec}, timeout=timeout)
        if status != 201:
            raise RuntimeError(f"POST /api/kernels {spec!r} answered {status}: {body}")
        kid = body["id"]
        self.live.add(kid)
        t1 = perf()
        with KernelWS(self.gw, kid, timeout=60) as ws:
            ws.collect(ws.send(make_msg("kernel_info_request", {})), timeout=60)
            t2 = perf()
            rec = {"kernel_id": kid, "total_s": t2 - t0, "post_s": t1 - t0, "kernel_info_s": t2 - t1}
            if spark_sum:
                out, _ = ws.run(SPARK_SUM, timeout=timeout)
                if out.strip() != "45":
                    raise RuntimeError(f"spark.range(10) summed to {out.strip()!r}, not 45")
                t3 = perf()
                rec["first_job_s"], rec["to_45_s"] = t3 - t2, t3 - t0
        return rec

    def delete(self, kid: str, timeout: float = 120) -> float:
        """DELETE one kernel; its duration (the gateway answers once the application is final)."""
        t0 = perf()
        status, body, _ = call(self.gw, "DELETE", f"/api/kernels/{kid}", timeout=timeout)
        if status != 204:
            raise RuntimeError(f"DELETE {kid} answered {status}: {body}")
        self.live.discard(kid)
        return perf() - t0

    def delete_all(self) -> None:
        """Delete every kernel still running, in parallel; failures are logged, not raised (cleanup)."""
        def one(kid: str) -> None:
            try:
                self.delete(kid)
            except Exception as exc:  # cleanup goes on; the cluster's stop kills what is left
                log(f"  delete {kid}: {exc}")
        with ThreadPoolExecutor(10) as pool:
            list(pool.map(one, list(self.live)))


def sequential_starts(bench: Bench, spec: str, count: int, timeout: float, spark_sum: bool) -> dict[str, Any]:
    """``count`` starts one after the other, each kernel deleted before the next; median/min/max per phase."""
    runs = []
    for i in range(count):
        rec = bench.start(spec, timeout, spark_sum)
        rec["delete_s"] = bench.delete(rec["kernel_id"])
        log(f"  {spec} start {i + 1}/{count}: ready {rec['total_s']:.2f}s (POST {rec['post_s']:.2f}s)"
            + (f", 45 after {rec['to_45_s']:.2f}s" if spark_sum else ""))
        runs.append(rec)
    keys = [k for k in runs[0] if k.endswith("_s")]
    summary = {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                   "max": max(r[k] for r in runs)} for k in keys}
    return {"n": count, **summary, "runs": runs}


def request_kind(method: str, path: str) -> str:
    return f"{method} {_APP_ID.sub('{id}', path)}"


def idle_window(bench: Bench, proxy: CountingProxy, kernels: int, seconds: float, interval: float) -> dict[str, Any]:
    """RM requests made while ``kernels`` kernels sit idle for ``seconds``, scaled to per minute."""
    cpu0, t0 = ps.cpu_seconds(bench.gw.proc.pid), time.monotonic()
    time.sleep(seconds)  # the measurement window itself, not a synchronisation
    t1 = time.monotonic()
    gw_cpu = ps.cpu_seconds(bench.gw.proc.pid) - cpu0
    kinds = Counter(request_kind(m, p) for t, m, p in list(proxy.seen) if t0 <= t < t1)
    scale = 60.0 / (t1 - t0)
    total = sum(kinds.values()) * scale
    baseline = kernels * 60.0 / interval
    log(f"  {kernels} idle kernel(s): {dict(kinds)} in {t1 - t0:.1f}s")
    return {"kernels": kernels, "window_s": t1 - t0, "counts": dict(kinds),
            "per_min": {k: v * scale for k, v in kinds.items()}, "total_per_min": total,
            "per_kernel_poller_per_min": baseline, "ratio_to_per_kernel": total / baseline if baseline else None,
            "gateway_cpu_pct": 100 * gw_cpu / (t1 - t0)}


def write_specs(data: Path, cluster: YarnCluster, proxy: CountingProxy, jar: Path, args: argparse.Namespace,
                instance: str) -> None:
    """The private kernelspecs ``yarn`` (native) and, unless --no-spark, ``spark`` (spark-submit cluster mode)."""
    am_command = (f"{{{{JAVA_HOME}}}}/bin/java -Xmx64m -cp '{jar}:{cluster.hadoop_classpath}' "
                  f"{AM_MAIN_CLASS} --")  # as tests/integration/yarn/conftest.py: yarn_am_command
    common = {"rm_urls": [proxy.url], "instance_name": instance, "poll_interval": args.poll_interval,
              "response_host": cluster.gateway_address}
    write_spec(data, "yarn", {**common, "am_command": am_command, "memory": args.native_memory,
                              "port_range": NATIVE_PORTS, "launch_timeout": args.start_timeout})
    if args.no_spark:
        return
    from tests.integration.yarn.test_spark_kernels import SPARK_HOME, spark_argv

    env = {"SPARK_HOME": SPARK_HOME, "SPARK_LOCAL_IP": cluster.gateway_address, **cluster.env}
    config = {**common, "memory": "1g", "max_memory": "2g", "port_range": SPARK_PORTS,
              "launch_timeout": args.spark_timeout}
    spec_dir = data / "kernels" / "spark"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": spark_argv(), "display_name": "Spark on YARN (bench)", "language": "python",
        "interrupt_mode": "message", "env": env,
        "metadata": {"kernel_provisioner": {"provisioner_name": "yarn-spark-provisioner", "config": config}}}))


def check_spark() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        sys.exit("Spark rows need pyspark in this interpreter's environment (pip install pyspark into .venv), "
                 "or pass --no-spark")


def run(args: argparse.Namespace, tmp: Path, results: dict[str, Any]) -> None:
    """Cluster, jar, proxy, gateway, measurements; everything started is stopped in the ``finally`` blocks."""
    log("[yarn] AM jar (cached per source hash)")
    jar = build_am_jar()
    log("[yarn] starting the test cluster (waits while another session holds it)")
    cluster = start_cluster(tmp / "yarn", nodes=2)
    results["meta"]["cluster"] = {"rm_url": cluster.rm_url, "nodes": [n.address for n in cluster.nodes],
                                  "timings_s": dict(cluster.timings)}
    proxy = CountingProxy(cluster.rm_url)
    gw = bench = None
    try:
        instance = f"kgw-bench-{uuid.uuid4().hex[:8]}"
        write_specs(tmp / "data", cluster, proxy, jar, args, instance)
        gw = start_gateway(tmp_path=tmp, env={"JUPYTER_PATH": str(tmp / "data"),
                                              "GATEWAY_KERNEL_LAUNCH_TIMEOUT": str(int(args.spark_timeout + 60))},
                           timeout=60)
        bench = Bench(gw)
        log(f"[gateway] {gw.url} pid {gw.proc.pid}; RM {cluster.rm_url} through {proxy.url}")

        log(f"[start] native: {args.starts} sequential starts")
        results["start"]["native"] = sequential_starts(bench, "yarn", args.starts, args.start_timeout, False)
        if not args.no_spark:
            log(f"[start] spark: {args.spark_starts} sequential starts")
            results["start"]["spark"] = sequential_starts(bench, "spark", args.spark_starts, args.spark_timeout, True)

        log(f"[idle] RM requests over {args.window:g}s windows, poll interval {args.poll_interval:g}s")
        idle = results["idle"]
        idle.append(idle_window(bench, proxy, 0, args.window, args.poll_interval))
        bench.start("yarn", args.start_timeout)
        idle.append(idle_window(bench, proxy, 1, args.window, args.poll_interval))
        started = perf()
        with ThreadPoolExecutor(args.kernels - 1) as pool:
            list(pool.map(lambda _: bench.start("yarn", args.start_timeout), range(args.kernels - 1)))
        results["meta"]["concurrent_start_s"] = {"kernels": args.kernels - 1, "wall_s": perf() - started}
        log(f"  {args.kernels - 1} more kernels ready in {perf() - started:.1f}s")
        idle.append(idle_window(bench, proxy, args.kernels, args.window, args.poll_interval))
    finally:
        with contextlib.suppress(Exception):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup has deadlines; a second Ctrl-C would cut it short
        log("[cleanup] kernels, gateway, proxy, cluster")
        try:
            if bench is not None and bench.live:
                bench.delete_all()
        finally:
            try:
                if gw is not None:
                    gw.stop()
                    if sys.exc_info()[0] is not None:  # failed or interrupted: the gateway's side of it
                        log("[gateway] end of its log:\n" + "\n".join(gw.log().splitlines()[-25:]))
            finally:
                proxy.shutdown()
                proxy.server_close()
                cluster.stop()


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    meta = results["meta"]
    print(f"\nYARN kernel benchmark {meta['time']}  cpus={meta['cpus']}  "
          f"loadavg start={'/'.join(f'{x:.1f}' for x in meta['loadavg_start'])} "
          f"end={'/'.join(f'{x:.1f}' for x in meta.get('loadavg_end', ()))}  nodes={len(meta['cluster']['nodes'])}")
    rows = []
    for kind, s in results["start"].items():
        rows.append([kind, s["n"], s["total_s"]["median"], s["total_s"]["min"], s["total_s"]["max"],
                     s["post_s"]["median"], s["kernel_info_s"]["median"],
                     s["to_45_s"]["median"] if "to_45_s" in s else None,
                     s["first_job_s"]["median"] if "first_job_s" in s else None, s["delete_s"]["median"]])
    if rows:
        table("kernel start: POST /api/kernels -> kernel_info_reply on the websocket, sequential (s)",
              ["kernels", "n", "ready med", "min", "max", "POST med", "ws+info med", "sum=45 med",
               "first job med", "DELETE med"], rows)
        print("  (sum=45: from the POST until spark.range(10).groupBy().sum() printed 45; "
              "first job: from ready until then)")
    idle = results["idle"]
    if idle:
        kinds = sorted({k for w in idle for k in w["counts"]})
        rows = [[str(w["kernels"]), w["total_per_min"], *(w["per_min"].get(k, 0.0) for k in kinds),
                 w["per_kernel_poller_per_min"], w["ratio_to_per_kernel"], w["gateway_cpu_pct"]] for w in idle]
        table(f"RM requests per minute with idle native kernels, by kind ({args.window:g}s windows, "
              f"poll interval {args.poll_interval:g}s)",
              ["kernels", "total", *kinds, "per-kernel poller", "x per-kernel", "gw cpu %"], rows)
        print("  (per-kernel poller = kernels x 60 / poll interval: one status query per kernel and interval)")
    if "concurrent_start_s" in meta:
        c = meta["concurrent_start_s"]
        print(f"\n{c['kernels']} native kernels started at once: all ready after {c['wall_s']:.1f}s")
    if meta.get("error"):
        print(f"\n!! {meta['error']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--starts", type=int, default=5, help="sequential native kernel starts")
    ap.add_argument("--spark-starts", type=int, default=3, help="sequential Spark kernel starts")
    ap.add_argument("--window", type=float, default=30.0, help="seconds of each idle RM-request window")
    ap.add_argument("--kernels", type=int, default=10, help="native kernels in the largest idle window")
    ap.add_argument("--poll-interval", type=float, default=1.0, help="the provisioner's poll_interval (s)")
    ap.add_argument("--native-memory", default="256m", help="container memory of a native kernel")
    ap.add_argument("--start-timeout", type=float, default=150.0, help="deadline of one native start (s)")
    ap.add_argument("--spark-timeout", type=float, default=300.0, help="deadline of one Spark start and its sum (s)")
    ap.add_argument("--no-spark", action="store_true", help="skip the Spark kernels (no pyspark needed)")
    ap.add_argument("--quick", action="store_true", help="1 start of each kind, 10 s windows")
    ap.add_argument("--json", type=Path, help="write all figures, per run, to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.starts, args.spark_starts, args.window = 1, 1, 10.0
    if args.starts < 1 or args.spark_starts < 1 or args.kernels < 2 or args.window <= 0:
        ap.error("--starts and --spark-starts must be at least 1, --kernels at least 2, --window above 0")
    return args


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.no_spark:
        check_spark()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)  # a kill runs the same cleanup as Ctrl-C
    results: dict[str, Any] = {"meta": run_meta(args), "start": {}, "idle": []}
    with tempfile.TemporaryDirectory(prefix="bench-yarn-") as tmp:
        status = guarded(results, lambda: run(args, Path(tmp), results))
    results["meta"].setdefault("cluster", {"nodes": []})
    end_run(results, lambda: report(results, args), args.json)
    return status


if __name__ == "__main__":
    sys.exit(main())
