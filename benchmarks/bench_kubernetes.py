#!/usr/bin/env python
"""Kubernetes kernel figures: pod kernel start-to-ready against a local kernel, and what idle kernels cost the API.

    python benchmarks/bench_kubernetes.py [--starts 10] [--kernels 20] [--window 30] [--quick] [--json out.json]

Starts everything itself: the Kubernetes test cluster (tests/services/kubernetes_cluster.py, real v1.34 on this
machine; it waits for the cluster lock while a test session holds it), an :class:`ApiServerProxy` (the counting
proxy of tests/integration/kubernetes/test_scale.py) in front of the API server, private kernelspecs in a temp
``JUPYTER_PATH`` (``pod``: ``kubernetes-provisioner`` with the project's kernel image, as the integration tests
write it) and our gateway on loopback whose kubeconfig names the proxy. Then it measures:

1. start to ready: ``POST /api/kernels`` until the ``kernel_info_reply`` over the websocket, median and p90 of
   ``--starts`` starts of a pod kernel, interleaved with as many starts of the local ``python3`` kernel (the
   baseline, same gateway, same run); each kernel deleted before the next; one warm-up start of each first;
2. if the ``spark-kubernetes-provisioner`` entry point is installed, ``--spark-starts`` sequential starts of a
   Spark driver pod kernel, made as tests/integration/kubernetes/test_spark_kubernetes.py makes it (the Spark
   image, the drivers' service account, ``kernel-gateway specs install spark-kubernetes``), and the time until
   ``spark.range(10)`` sums to 45 on executor pods; else a line "skipped: ...";
3. Kubernetes API requests per minute, counted by the proxy, while 1 and then ``--kernels`` pod kernels sit
   idle for ``--window`` seconds each (the extra kernels started at once; that wall time is printed too), by
   request kind, with the gateway's CPU in each window; and the API requests each start and delete cost.

A start the gateway refuses (e.g. 502) is noted, left out of the figures and tried again; the report lists them.
Everything is removed on exit, also on failure and Ctrl-C: kernels deleted, gateway stopped, proxy and cluster
stopped. Needs root (the cluster). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import types
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import _procstat as ps  # noqa: E402
from bench_gateway import end_run, guarded, log, pct, run_meta, table  # noqa: E402
from bench_yarn import Bench, _sigterm, sequential_starts  # noqa: E402

from tests.integration.kubernetes.test_kubernetes_kernels import k8s_gateway  # noqa: E402
from tests.integration.kubernetes.test_scale import (  # noqa: E402
    ApiServerProxy,
    idle_window,
    per_minute,
)
from tests.services.kubernetes_cluster import KubernetesCluster, start_cluster  # noqa: E402

perf = time.perf_counter
LOCAL, POD, SPARK = "python3", "pod", "spark-k8s"
SPARK_PROVISIONER = "spark-kubernetes-provisioner"


def percentiles(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p90": pct(values, 90), "min": min(values), "max": max(values)}


def failed_start(failures: list[dict[str, str]], spec: str, exc: Exception) -> None:
    """Note a start the gateway refused (the figures leave it out; the report counts and shows them)."""
    failures.append({"spec": spec, "error": str(exc)})
    log(f"  {spec} start FAILED (retried): {str(exc)[:300]}")


def start_pod_kernel(bench: Bench, timeout: float, failures: list[dict[str, str]]) -> None:
    """One pod kernel started and left running; a refused start is noted and tried again (three tries)."""
    for attempt in range(3):
        try:
            bench.start(POD, timeout)
            return
        except RuntimeError as exc:
            failed_start(failures, POD, exc)
            if attempt == 2:
                raise


def interleaved_starts(bench: Bench, specs: list[str], count: int, timeout: float,
                       failures: list[dict[str, str]]) -> dict[str, Any]:
    """``count`` rounds of one start of each spec (so load drifts affect all alike), each deleted before the next;
    a failed start is noted in ``failures`` and tried again (at most ``count`` failures in all)."""
    runs: dict[str, list[dict[str, Any]]] = {spec: [] for spec in specs}
    for _ in range(count):
        for spec in specs:
            while True:
                try:
                    runs[spec].append(sequential_starts(bench, spec, 1, timeout, False)["runs"][0])
                    break
                except RuntimeError as exc:
                    failed_start(failures, spec, exc)
                    if len(failures) > count:
                        raise
    return {spec: {"n": count, **{key: percentiles([r[key] for r in recs]) for key in recs[0] if key.endswith("_s")},
                   "runs": recs} for spec, recs in runs.items()}


def spark_spec(args: argparse.Namespace, data: Path, cluster: KubernetesCluster, instance: str) -> str:
    """The Spark-on-Kubernetes kernelspec ``spark-k8s`` under ``data``, as its integration tests make it (their
    image, service account, Role and ``specs install spark-kubernetes`` call); '' or why there is none."""
    if args.no_spark:
        return "--no-spark"
    if not any(e.name == SPARK_PROVISIONER for e in entry_points(group="jupyter_client.kernel_provisioners")):
        return f"the {SPARK_PROVISIONER} entry point is not installed (provisioners/kubernetes_spark.py)"
    try:
        from tests.integration.kubernetes.conftest import spark_kernel_image
        from tests.integration.kubernetes.test_spark_kubernetes import install_spec, spark_kubeconfig
        from tests.services.kubernetes_build import spark_image
    except ImportError as exc:
        return f"the Spark-on-Kubernetes test helpers are missing: {exc}"
    try:
        log("[spark] the Spark kernel image (built once per inputs), its import, the drivers' service account")
        # the fixtures' own bodies, outside pytest
        image = spark_kernel_image.__wrapped__(spark_image(), cluster)
        kubeconfig = spark_kubeconfig.__wrapped__(cluster, types.SimpleNamespace(
            mktemp=lambda name: Path(tempfile.mkdtemp(prefix=name, dir=data.parent))))
        spec = install_spec(data.parent / "spark-prefix", SPARK, image, *args.spark_spec_arg)
    except Exception as exc:  # the pod figures stand without it
        return f"the Spark kernelspec could not be made: {type(exc).__name__}: {str(exc)[-500:]}"
    # what the gateway's environment gives it in the tests; spark-submit talks to the API server itself, so this
    # spec uses the cluster's kubeconfig (not the proxy's) and its own instance name (its own watcher reaps by it)
    spec["metadata"]["kernel_provisioner"]["config"].update(
        kubeconfig=kubeconfig, response_host=cluster.node_ip, instance_name=f"{instance}-spark",
        launch_timeout=args.spark_timeout)
    target = data / "kernels" / SPARK
    target.mkdir(parents=True, exist_ok=True)
    (target / "kernel.json").write_text(json.dumps(spec))
    return ""


def idle(bench: Bench, proxy: ApiServerProxy, kernels: int, seconds: float) -> dict[str, Any]:
    """API requests while ``kernels`` kernels sit idle for ``seconds``, per kind and per minute; the gateway's CPU."""
    cpu0 = ps.cpu_seconds(bench.gw.proc.pid)
    counts, window = idle_window(proxy, seconds)
    gw_cpu = ps.cpu_seconds(bench.gw.proc.pid) - cpu0
    log(f"  {kernels} idle kernel(s): {dict(counts)} in {window:.1f}s")
    return {"kernels": kernels, "window_s": window, "counts": dict(counts),
            "per_min": {k: v * 60.0 / window for k, v in counts.items()}, "total_per_min": per_minute(counts, window),
            "gateway_cpu_pct": 100 * gw_cpu / window}


def stop_gateway(gw: Any, failed: bool) -> None:
    gw.stop()
    if failed:  # the gateway's side of a failure or an interruption
        log("[gateway] end of its log:\n" + "\n".join(gw.log().splitlines()[-25:]))


def run(args: argparse.Namespace, tmp: Path, results: dict[str, Any]) -> None:
    """Cluster, proxy, gateway, measurements. Everything started is stopped on the way out, in reverse order, each
    step even when an earlier one failed (a second Ctrl-C cuts only the step it lands in)."""
    with contextlib.ExitStack() as stack:
        log("[k8s] starting the test cluster (waits while another session holds it)")
        cluster = start_cluster(tmp / "kubernetes")
        stack.callback(cluster.stop)
        results["meta"]["cluster"] = {"api_url": cluster.api_url, "timings_s": dict(cluster.timings)}
        proxy = ApiServerProxy(cluster)
        stack.callback(proxy.close)
        instance = f"kgw-bench-{uuid.uuid4().hex[:8]}"
        kubeconfig = proxy.write_kubeconfig(tmp / "kubeconfig")
        skipped = spark_spec(args, tmp / "data", cluster, instance)
        gw = k8s_gateway(tmp, cluster, instance, kubeconfig=kubeconfig, launch_timeout=args.start_timeout)
        stack.push(lambda kind, exc, tb: stop_gateway(gw, kind is not None))
        bench = Bench(gw)
        stack.callback(bench.delete_all)
        stack.callback(log, "[cleanup] kernels, gateway, proxy, cluster")
        log(f"[gateway] {gw.url} pid {gw.proc.pid}; API {cluster.api_url} through {proxy.url}")
        measure(args, bench, proxy, skipped, results)


def measure(args: argparse.Namespace, bench: Bench, proxy: ApiServerProxy, skipped: str,
            results: dict[str, Any]) -> None:
    """Start-to-ready (local, pod, Spark), then the idle windows with 1 and ``args.kernels`` pod kernels."""
    log("[start] warm-up: one start of each (client configuration, the watch, imports)")
    failures = results["failed_starts"]
    interleaved_starts(bench, [LOCAL, POD], 1, args.start_timeout, failures)
    log(f"[start] {args.starts} rounds of a local and a pod kernel start")
    begin = time.monotonic()
    results["start"] = interleaved_starts(bench, [LOCAL, POD], args.starts, args.start_timeout, failures)
    requests = proxy.requests_between(begin, time.monotonic())
    results["requests_per_pod_kernel"] = {k: v / args.starts for k, v in requests.items()}
    for spec in (LOCAL, POD):
        s = results["start"][spec]["total_s"]
        log(f"  {spec}: ready median {s['median']:.2f}s p90 {s['p90']:.2f}s")

    if skipped:
        results["spark"] = {"skipped": skipped}
    else:
        log(f"[start] spark: {args.spark_starts} sequential starts")
        try:
            spark = results["start"][SPARK] = sequential_starts(bench, SPARK, args.spark_starts, args.spark_timeout,
                                                                True)
            spark["total_s"]["p90"] = pct([r["total_s"] for r in spark["runs"]], 90)
        except Exception as exc:  # the pod figures stand; the Spark row says why it has none
            results["spark"] = {"failed": f"{type(exc).__name__}: {exc}"}
            log(f"  spark failed: {results['spark']['failed']}")

    log(f"[idle] API requests over {args.window:g}s windows")
    start_pod_kernel(bench, args.start_timeout, failures)
    results["idle"].append(idle(bench, proxy, 1, args.window))
    started = perf()
    with ThreadPoolExecutor(args.kernels - 1) as pool:
        list(pool.map(lambda _: start_pod_kernel(bench, args.start_timeout, failures), range(args.kernels - 1)))
    results["meta"]["concurrent_start_s"] = {"kernels": args.kernels - 1, "wall_s": perf() - started}
    log(f"  {args.kernels - 1} more kernels ready in {perf() - started:.1f}s")
    results["idle"].append(idle(bench, proxy, args.kernels, args.window))


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    meta = results["meta"]
    print(f"\nKubernetes kernel benchmark {meta['time']}  cpus={meta['cpus']}  "
          f"loadavg start={'/'.join(f'{x:.1f}' for x in meta['loadavg_start'])} "
          f"end={'/'.join(f'{x:.1f}' for x in meta.get('loadavg_end', ()))}")
    start = results["start"]
    local = start.get(LOCAL, {}).get("total_s", {}).get("median")
    rows = []
    for spec, s in start.items():
        total = s["total_s"]
        rows.append([spec, s["n"], total["median"], total.get("p90"), total["min"],
                     total["max"], total["median"] / local if local else None, s["post_s"]["median"],
                     s["kernel_info_s"]["median"], s["to_45_s"]["median"] if "to_45_s" in s else None,
                     s["delete_s"]["median"]])
    if rows:
        table("kernel start: POST /api/kernels -> kernel_info_reply on the websocket (s)",
              ["kernel", "n", "ready med", "p90", "min", "max", "x local", "POST med", "ws+info med", "sum=45 med",
               "DELETE med"], rows)
    spark = results.get("spark", {})
    if "skipped" in spark:
        print(f"  {SPARK}: skipped: {spark['skipped']}")
    elif "failed" in spark:
        print(f"  {SPARK}: failed: {spark['failed']}")
    if results.get("requests_per_pod_kernel"):
        print("  API requests per pod kernel start + delete: " + ", ".join(
            f"{k} {v:g}" for k, v in sorted(results["requests_per_pod_kernel"].items())))
    windows = results["idle"]
    if windows:
        kinds = sorted({k for w in windows for k in w["counts"]})
        rows = [[str(w["kernels"]), w["total_per_min"], *(w["per_min"].get(k, 0.0) for k in kinds),
                 w["gateway_cpu_pct"]] for w in windows]
        table(f"Kubernetes API requests per minute with idle pod kernels ({args.window:g}s windows, counted by a "
              "proxy in front of the API server)", ["kernels", "total", *kinds, "gw cpu %"], rows)
        print("  (the one pod watch is a single request the server ends after 300 s; a window that sees it "
              "resumed counts 1)")
    failures = results.get("failed_starts") or []
    if failures:
        print(f"\n{len(failures)} start(s) failed and were tried again (not in the figures):")
        for reason, n in Counter(f"{f['spec']}: {f['error'][:240]}" for f in failures).most_common():
            print(f"  {n} x {reason}")
    at_once = meta.get("concurrent_start_s")
    for line in ([f"{at_once['kernels']} pod kernels started at once: all ready after {at_once['wall_s']:.1f}s"]
                 if at_once else []) + ([f"!! {meta['error']}"] if meta.get("error") else []):
        print(f"\n{line}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--starts", type=int, default=10, help="rounds of one local and one pod kernel start")
    ap.add_argument("--kernels", type=int, default=20, help="pod kernels in the larger idle window")
    ap.add_argument("--window", type=float, default=30.0, help="seconds of each idle API-request window")
    ap.add_argument("--start-timeout", type=float, default=180.0, help="deadline of one kernel start (s)")
    ap.add_argument("--spark-starts", type=int, default=3, help="sequential Spark kernel starts")
    ap.add_argument("--spark-timeout", type=float, default=300.0, help="deadline of one Spark start and its sum (s)")
    ap.add_argument("--spark-spec-arg", action="append", default=[],
                    help="extra argument for 'specs install spark-kubernetes' (repeat)")
    ap.add_argument("--no-spark", action="store_true", help="skip the Spark kernels")
    ap.add_argument("--quick", action="store_true", help="3 rounds of starts, 1 Spark start, 10 s windows")
    ap.add_argument("--json", type=Path, help="write all figures, per start, to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.starts, args.spark_starts, args.window = 3, 1, 10.0
    if args.starts < 1 or args.spark_starts < 1 or args.kernels < 2 or args.window <= 0:
        ap.error("--starts and --spark-starts must be at least 1, --kernels at least 2, --window above 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # as in an activated venv: spark-submit (pyspark's, beside this Python) finds Spark through the python3 on PATH
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # the gateway's launch timeout (its own default 60 s overrides a kernelspec's launch_timeout)
    os.environ["GATEWAY_KERNEL_LAUNCH_TIMEOUT"] = f"{max(args.start_timeout, args.spark_timeout):g}"
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)  # a kill runs the same cleanup as Ctrl-C
    results: dict[str, Any] = {"meta": run_meta(args), "start": {}, "idle": [], "failed_starts": []}

    def body() -> None:
        with tempfile.TemporaryDirectory(prefix="bench-kubernetes-") as tmp:
            run(args, Path(tmp), results)

    status = guarded(results, body)
    end_run(results, lambda: report(results, args), args.json)
    return status


if __name__ == "__main__":
    sys.exit(main())
