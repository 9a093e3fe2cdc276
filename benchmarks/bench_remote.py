"""Remote-kernel figures: SSH (and, with --docker, container) kernels against local ones, in one run.

    python benchmarks/bench_remote.py [--starts 5] [--concurrent 20] [--docker]

Prints, per backend: kernel start to first kernel_info_reply (median/max of sequential starts, and
its ratio to a local kernel measured in the same run); the wall time of N concurrent starts; and the
latency of GET /api (p50/p99, sampled every 10 ms) while those starts run, which stays low only if
no launch blocks the gateway's event loop. Starts the SSH hosts (network namespaces with sshd) and
the gateway itself; needs root, like the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.ssh.conftest import PORT_RANGE, write_ssh_spec  # noqa: E402
from tests.services.client import KernelWS, call, make_msg  # noqa: E402
from tests.services.gateway import start_gateway  # noqa: E402
from tests.services.sshd import start_cluster  # noqa: E402


def ready_time(gw, spec: str) -> tuple[float, str]:
    """Seconds from POST /api/kernels until the kernel answers kernel_info over the websocket."""
    started = time.perf_counter()
    status, body, _ = call(gw, "POST", "/api/kernels", {"name": spec}, timeout=120)
    if status != 201:
        raise RuntimeError(f"start of {spec} failed: {status} {body}")
    with KernelWS(gw, body["id"]) as ws:
        ws.collect(ws.send(make_msg("kernel_info_request", {})), timeout=60)
    return time.perf_counter() - started, body["id"]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def sequential(gw, spec: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        seconds, kid = ready_time(gw, spec)
        times.append(seconds)
        call(gw, "DELETE", f"/api/kernels/{kid}")
    return times


def concurrent(gw, spec: str, count: int) -> tuple[float, list[float]]:
    """Start ``count`` kernels at once while sampling GET /api; return wall time and the latencies (ms)."""
    latencies: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            call(gw, "GET", "/api", auth=False)
            latencies.append(1000 * (time.perf_counter() - t0))
            done.wait(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(lambda _: ready_time(gw, spec), range(count)))
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    for _, kid in results:
        call(gw, "DELETE", f"/api/kernels/{kid}")
    return wall, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    cluster = start_cluster(tmp / "sshd", count=2)
    figures: dict[str, dict] = {}
    try:
        write_ssh_spec(tmp / "data", "ssh", cluster, load_balancing="least-connection")
        gw = start_gateway(f"--ResponseListener.response_port_range={PORT_RANGE}", tmp_path=tmp,
                           env={"JUPYTER_PATH": str(tmp / "data")})
        try:
            for spec in ("python3", "ssh"):
                sequential(gw, spec, 1)  # warm-up: imports, SSH connections
                seq = sequential(gw, spec, args.starts)
                wall, lat = concurrent(gw, spec, args.concurrent)
                figures[spec] = {"start_median_s": statistics.median(seq), "start_max_s": max(seq),
                                 "concurrent_wall_s": wall, "api_p50_ms": pct(lat, 50), "api_p99_ms": pct(lat, 99),
                                 "api_samples": len(lat)}
        finally:
            gw.stop()
    finally:
        cluster.stop()
    local = figures["python3"]["start_median_s"]
    print(f"\nkernel start to first kernel_info_reply; {args.concurrent} concurrent starts with GET /api sampled every 10 ms")
    print(f"{'backend':10} {'start med':>10} {'start max':>10} {'x local':>8} {'N at once':>10} {'/api p50':>9} {'/api p99':>9}")
    for name, f in figures.items():
        print(f"{name:10} {f['start_median_s']:9.2f}s {f['start_max_s']:9.2f}s {f['start_median_s'] / local:8.2f} "
              f"{f['concurrent_wall_s']:9.2f}s {f['api_p50_ms']:7.1f}ms {f['api_p99_ms']:7.1f}ms")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
