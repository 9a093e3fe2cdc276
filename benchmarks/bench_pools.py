"""Warm pools against cold starts: start to first kernel_info_reply, per backend, in one run.

    python benchmarks/bench_pools.py [--starts 10] [--no-ssh] [--docker] [--kubernetes] [--yarn] [--json out.json]

For each backend (local ipykernel; SSH hosts; with --docker, Docker containers; with --kubernetes, pods on the test
cluster; with --yarn, native YARN applications on the test cluster) two kernelspecs that differ
only in ``pool_size``: one cold, one with a pool. Each start is ``POST /api/kernels``, then the websocket and a
``kernel_info_request`` until its reply (bench_remote.ready_time); before each pooled start the pool is full
again, so every pooled start is a hit. Prints medians and maxima, the pooled/cold ratio, and the goal
(pooled <= 100 ms). Starts the SSH hosts and the gateway itself; needs root, like the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_remote import ready_time  # noqa: E402
from tests.api.helpers import IPYKERNEL_ARGV, write_spec  # noqa: E402
from tests.integration.ssh.conftest import PORT_RANGE, write_ssh_spec  # noqa: E402
from tests.services.client import call  # noqa: E402
from tests.services.gateway import start_gateway, wait_until  # noqa: E402
from tests.services.scrape import metric  # noqa: E402
from tests.services.sshd import start_cluster  # noqa: E402

GOAL_S = 0.100
POOL = 2


def starts(gw, spec: str, count: int, pooled: bool) -> list[float]:
    """``count`` sequential start times of ``spec``; pooled: each once the pool is full again."""
    times = []
    for _ in range(count):
        if pooled:
            wait_until(lambda: metric(gw, "kernel_gateway_pool_kernels", kernelspec=spec, state="ready") == POOL,
                       180, 0.05, what=f"the pool of {spec} full")
        seconds, kid = ready_time(gw, spec)
        times.append(seconds)
        call(gw, "DELETE", f"/api/kernels/{kid}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--no-ssh", action="store_true", help="skip the SSH hosts")
    parser.add_argument("--docker", action="store_true", help="also measure Docker container kernels")
    parser.add_argument("--kubernetes", action="store_true", help="also measure pod kernels (starts the test cluster)")
    parser.add_argument("--yarn", action="store_true", help="also measure native YARN kernels (starts the test cluster)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-pools-"))
    data = tmp / "data"
    pool = {"kernel_provisioner": {"provisioner_name": "local-port-range-provisioner", "config": {"pool_size": POOL}}}
    write_spec(data, "local", IPYKERNEL_ARGV)
    write_spec(data, "local-pooled", IPYKERNEL_ARGV, metadata=pool)
    backends = ["local"]
    cluster = None
    figures: dict[str, dict] = {}
    stack = contextlib.ExitStack()
    try:
        if not args.no_ssh:
            cluster = start_cluster(tmp / "sshd", count=2, niceness=10, cpus=1.0)
            write_ssh_spec(data, "ssh", cluster)
            write_ssh_spec(data, "ssh-pooled", cluster, pool_size=POOL)
            backends.append("ssh")
        if args.docker:
            from tests.integration.docker.conftest import write_container_spec
            from tests.services.docker_engine import build_images, ensure_docker

            images = build_images(ensure_docker())
            config = {"image": images["kernel"], "instance_name": f"bench-{tmp.name}"}
            write_container_spec(data, "docker", "docker-provisioner", config)
            write_container_spec(data, "docker-pooled", "docker-provisioner", {**config, "pool_size": POOL})
            backends.append("docker")
        if args.kubernetes:
            from tests.integration.docker.conftest import write_container_spec
            from tests.services.kubernetes_cluster import start_cluster as start_kubernetes

            k8s = start_kubernetes(tmp / "kubernetes")
            stack.callback(k8s.stop)
            config = {"image": k8s.kernel_image, "image_pull_policy": "Never", "kubeconfig": k8s.kubeconfig,
                      "response_host": k8s.node_ip, "instance_name": f"bench-{tmp.name}", "namespace": "default"}
            write_container_spec(data, "pod", "kubernetes-provisioner", config)
            write_container_spec(data, "pod-pooled", "kubernetes-provisioner", {**config, "pool_size": POOL})
            backends.append("pod")
        if args.yarn:
            from launchers.yarn import AM_MAIN_CLASS, build_am_jar
            from tests.integration.yarn.test_yarn_kernels import write_spec as write_yarn_spec
            from tests.services.yarn_cluster import start_cluster as start_yarn

            jar = build_am_jar()
            yarn = start_yarn(tmp / "yarn", nodes=1)
            stack.callback(yarn.stop)
            config = {"rm_urls": [yarn.rm_url], "instance_name": f"bench-{tmp.name}", "poll_interval": 0.5,
                      "response_host": yarn.gateway_address, "memory": "384m",
                      "am_command": f"{{{{JAVA_HOME}}}}/bin/java -Xmx64m -cp '{jar}:{yarn.hadoop_classpath}' {AM_MAIN_CLASS} --"}
            write_yarn_spec(data, "yarn", config)
            write_yarn_spec(data, "yarn-pooled", {**config, "pool_size": POOL})
            backends.append("yarn")
        gw = start_gateway(f"--ResponseListener.response_port_range={PORT_RANGE}", tmp_path=tmp,
                           env={"JUPYTER_PATH": str(data), "GATEWAY_POOL_CHECK_INTERVAL": "0.2"})
        try:
            for backend in backends:
                starts(gw, backend, 1, False)  # warm-up: imports, SSH connections, the Docker client
                cold = starts(gw, backend, args.starts, False)
                warm = starts(gw, f"{backend}-pooled", args.starts, True)
                figures[backend] = {"cold_median_s": statistics.median(cold), "cold_max_s": max(cold),
                                    "pooled_median_s": statistics.median(warm), "pooled_max_s": max(warm),
                                    "cold": cold, "pooled": warm}
        finally:
            gw.stop()
    finally:
        if cluster is not None:
            cluster.stop()
        stack.close()
    print(f"\nstart to first kernel_info_reply, {args.starts} sequential starts each, at {time.strftime('%H:%M')}")
    print(f"{'backend':8} {'cold med':>9} {'cold max':>9} {'pool med':>9} {'pool max':>9} {'pool/cold':>9}  goal <= {GOAL_S * 1000:.0f} ms")
    for name, f in figures.items():
        ok = "met" if f["pooled_median_s"] <= GOAL_S else "MISSED"
        print(f"{name:8} {f['cold_median_s'] * 1000:7.0f}ms {f['cold_max_s'] * 1000:7.0f}ms "
              f"{f['pooled_median_s'] * 1000:7.0f}ms {f['pooled_max_s'] * 1000:7.0f}ms "
              f"{f['pooled_median_s'] / f['cold_median_s']:9.2f}  {ok}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
