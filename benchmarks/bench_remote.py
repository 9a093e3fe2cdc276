"""Remote-kernel figures: SSH and container kernels against local ones, in one run.

    python benchmarks/bench_remote.py [--starts 5] [--concurrent 20] [--no-ssh] [--docker] [--memory-kernels 50]

Prints, per backend: kernel start to first kernel_info_reply (median/max of sequential starts, and
its ratio to a local kernel measured in the same run); the wall time of N concurrent starts; and the
latency of GET /api (p50/p99, sampled every 10 ms) while those starts run, which stays low only if
no launch blocks the gateway's event loop. Starts the SSH hosts (network namespaces with sshd) and
the gateway itself; needs root, like the test suite. With --docker it also starts the Docker engine,
builds the images if needed, and measures the gateway's resident memory with --memory-kernels
container kernels running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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


SAMPLER = """
import sys, time, urllib.request
url, stop = sys.argv[1], sys.argv[2]
import os
while not os.path.exists(stop):
    t0 = time.perf_counter()
    urllib.request.urlopen(url, timeout=30).read()
    print(round(1000 * (time.perf_counter() - t0), 2), flush=True)
    time.sleep(0.01)
"""


def _raise_priority() -> None:
    try:
        os.nice(-15)
    except PermissionError:
        pass


def concurrent(gw, spec: str, count: int) -> tuple[float, list[float]]:
    """Start ``count`` kernels at once while another process samples GET /api (so the client's own
    threads cannot distort the latencies); return the wall time and the latencies in ms."""
    stop = Path(tempfile.mkdtemp()) / "stop"
    # the sampler runs at a high priority (as root) so that what it measures is the gateway, not its own
    # wait for a CPU while the kernels being started keep both cores busy
    sampler = subprocess.Popen([sys.executable, "-c", SAMPLER, f"{gw.url}/api", str(stop)],
                               stdout=subprocess.PIPE, text=True, preexec_fn=_raise_priority)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(lambda _: ready_time(gw, spec), range(count)))
    wall = time.perf_counter() - t0
    stop.touch()
    out, _ = sampler.communicate(timeout=60)
    for _, kid in results:
        call(gw, "DELETE", f"/api/kernels/{kid}")
    return wall, [float(line) for line in out.split()]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def memory_with(gw, spec: str, count: int) -> dict:
    """Gateway resident memory idle and with ``count`` kernels of ``spec`` running (started 10 at a time)."""
    idle = rss_mb(gw.proc.pid)
    ids: list[str] = []
    try:
        with ThreadPoolExecutor(10) as pool:
            for seconds_and_id in pool.map(lambda _: ready_time(gw, spec), range(count)):
                ids.append(seconds_and_id[1])
        loaded = rss_mb(gw.proc.pid)
    finally:
        for kid in ids:
            call(gw, "DELETE", f"/api/kernels/{kid}")
    return {"kernels": count, "idle_mb": idle, "loaded_mb": loaded, "per_kernel_mb": (loaded - idle) / max(count, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--no-ssh", action="store_true", help="skip the SSH hosts")
    parser.add_argument("--docker", action="store_true", help="also measure Docker container kernels")
    parser.add_argument("--memory-kernels", type=int, default=50)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    specs = ["python3"]
    cluster = None
    figures: dict[str, dict] = {}
    try:
        if not args.no_ssh:
            # the SSH hosts share this machine's two cores: held to one core at a lower priority they
            # stand in for other machines, so GET /api measures the gateway, not CPUs busy starting kernels
            cluster = start_cluster(tmp / "sshd", count=2, niceness=10, cpus=1.0)
            write_ssh_spec(tmp / "data", "ssh", cluster, load_balancing="least-connection")
            specs.append("ssh")
        if args.docker:
            from tests.integration.docker.conftest import write_container_spec
            from tests.services.docker_engine import build_images, ensure_docker

            images = build_images(ensure_docker())
            write_container_spec(tmp / "data", "container", "docker-provisioner",
                                 {"image": images["kernel"], "instance_name": f"bench-{tmp.name}"})
            specs.append("container")
        gw = start_gateway(f"--ResponseListener.response_port_range={PORT_RANGE}", tmp_path=tmp,
                           env={"JUPYTER_PATH": str(tmp / "data")})
        try:
            for spec in specs:
                sequential(gw, spec, 1)  # warm-up: imports, SSH connections, the Docker client
                seq = sequential(gw, spec, args.starts)
                wall, lat = concurrent(gw, spec, args.concurrent)
                figures[spec] = {"start_median_s": statistics.median(seq), "start_max_s": max(seq),
                                 "concurrent_wall_s": wall, "api_p50_ms": pct(lat, 50), "api_p99_ms": pct(lat, 99),
                                 "api_samples": len(lat)}
            if args.docker:
                figures["container"]["memory"] = memory_with(gw, "container", args.memory_kernels)
        finally:
            gw.stop()
    finally:
        if cluster is not None:
            cluster.stop()
    local = figures["python3"]["start_median_s"]
    print(f"\nkernel start to first kernel_info_reply; {args.concurrent} concurrent starts with GET /api sampled every 10 ms")
    print(f"{'backend':10} {'start med':>10} {'start max':>10} {'x local':>8} {'N at once':>10} {'/api p50':>9} {'/api p99':>9}")
    for name, f in figures.items():
        print(f"{name:10} {f['start_median_s']:9.2f}s {f['start_max_s']:9.2f}s {f['start_median_s'] / local:8.2f} "
              f"{f['concurrent_wall_s']:9.2f}s {f['api_p50_ms']:7.1f}ms {f['api_p99_ms']:7.1f}ms")
    for name, f in figures.items():
        if "memory" in f:
            m = f["memory"]
            print(f"gateway memory with {m['kernels']} {name} kernels: idle {m['idle_mb']:.0f} MB, "
                  f"loaded {m['loaded_mb']:.0f} MB, {m['per_kernel_mb']:.2f} MB per kernel")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
