"""Warm pools of local kernels: a start request gets a waiting kernel at once, bound late to the request's environment
and working directory; pools refill, stay within the limits, drain when their kernelspec changes or goes and when
the gateway stops. Real gateway processes and real ipykernel kernels."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.api.helpers import IPYKERNEL_ARGV, alive, assert_error, children, clean_env, cmdline, post_kernel, write_spec
from tests.services.client import call, start_kernel
from tests.services.gateway import GatewayServer, wait_until
from tests.services.kernel_store import run
from tests.services.scrape import metric

POOLED = "pooled"


def pooled_spec(jupyter_path: Path, size: int = 2, name: str = POOLED, **extra) -> Path:
    return write_spec(jupyter_path, name, IPYKERNEL_ARGV, metadata={"kernel_provisioner": {
        "provisioner_name": "local-port-range-provisioner", "config": {"pool_size": size}}}, **extra)


def warm_pids(gw: GatewayServer) -> set[int]:
    """The gateway's kernel processes that were started warm: children running the launcher with ``--warm-local``
    (waiting, or handed out since)."""
    return {pid for pid in children(gw.proc.pid) if alive(pid) and "--warm-local" in cmdline(pid)}


def ready(gw: GatewayServer, name: str = POOLED) -> float:
    """Warm kernels ready in the pool of ``name``."""
    return metric(gw, "kernel_gateway_pool_kernels", kernelspec=name, state="ready")


@pytest.fixture
def jupyter_path(tmp_path: Path) -> Path:
    path = tmp_path / "jp"
    path.mkdir()
    return path


def start(start_gw, jupyter_path: Path, *args: str, **env: str) -> GatewayServer:
    return start_gw("--GatewayPolicy.max_kernels_per_user=10", *args,
                    env=clean_env(JUPYTER_PATH=str(jupyter_path), GATEWAY_POOL_CHECK_INTERVAL="0.5", **env))


def test_a_request_gets_a_warm_kernel_bound_to_its_environment_and_directory(start_gw, jupyter_path, tmp_path):
    pooled_spec(jupyter_path)
    gw = start(start_gw, jupyter_path)
    wait_until(lambda: ready(gw) == 2, 90, 0.2, what="two warm kernels")
    waiting = warm_pids(gw)
    assert len(waiting) == 2
    workdir = tmp_path / "work"
    workdir.mkdir()

    status, body, _ = post_kernel(gw, POOLED, {"KERNEL_USERNAME": "alice", "KERNEL_COLOR": "teal",
                                               "KERNEL_WORKING_DIR": str(workdir)})
    assert status == 201, body
    kid = body["id"]
    assert re.search(rf"kernel={kid} started warm kernel {POOLED}", gw.log())
    # the request's values reach the kernel: late binding, not a generic kernel
    out = run(gw, kid, "import os; print(os.environ['KERNEL_USERNAME'], os.environ['KERNEL_COLOR'], os.getcwd(), "
                       "os.environ['KERNEL_ID'], os.getpid())")
    assert out.split()[:4] == ["alice", "teal", str(workdir), kid]
    assert int(out.split()[4]) in waiting, "the kernel was not one of the waiting processes"
    assert metric(gw, "kernel_gateway_pool_hits_total", kernelspec=POOLED) == 1
    wait_until(lambda: ready(gw) == 2, 90, 0.2, what="the pool refilled")

    # a restart is an ordinary (cold) start of the same kernel, which keeps its environment
    assert call(gw, "POST", f"/api/kernels/{kid}/restart", timeout=90)[0] == 200
    assert run(gw, kid, "import os; print(os.environ['KERNEL_COLOR'])").strip() == "teal"
    assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
    assert "Traceback" not in gw.log()


def test_pools_stay_within_the_limits_and_count_toward_no_user(start_gw, jupyter_path):
    pooled_spec(jupyter_path, size=2)
    write_spec(jupyter_path, "cold", IPYKERNEL_ARGV)
    gw = start_gw("--GatewayPolicy.max_kernels=3", "--GatewayPolicy.max_kernels_per_user=1",
                  env=clean_env(JUPYTER_PATH=str(jupyter_path), GATEWAY_POOL_CHECK_INTERVAL="0.5"))
    wait_until(lambda: ready(gw) == 2, 90, 0.2, what="two warm kernels")
    first = start_kernel(gw, POOLED, env={"KERNEL_USERNAME": "alice"})  # warm: alice's only kernel
    # warm kernels were alice's for none of this: her limit counts the one she has
    assert_error(post_kernel(gw, POOLED, {"KERNEL_USERNAME": "alice"}), 429, "limit per user is 1")
    # one kernel and the pool's two fill max_kernels=3: the refill waits for room
    wait_until(lambda: metric(gw, "kernel_gateway_pool_kernels", kernelspec=POOLED, state="warming") == 0,
               60, 0.2, what="warm-ups settled")
    assert ready(gw) + 1 <= 3
    # a cold start of another kernelspec takes its room from the pool rather than failing
    bob = start_kernel(gw, "cold", env={"KERNEL_USERNAME": "bob"})
    assert ready(gw) + 2 <= 3
    assert "its room is needed for a cold start" in gw.log()
    for kid in (first, bob):
        assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
    wait_until(lambda: ready(gw) == 2, 90, 0.2, what="the pool refilled once there was room")


def test_pools_drain_when_their_kernelspec_changes_or_goes_and_when_the_gateway_stops(start_gw, jupyter_path):
    spec_dir = pooled_spec(jupyter_path, size=2)
    gw = start(start_gw, jupyter_path)
    wait_until(lambda: ready(gw) == 2 and len(warm_pids(gw)) == 2, 90, 0.2, what="two warm kernels")
    before = warm_pids(gw)

    spec = json.loads((spec_dir / "kernel.json").read_text())
    spec["env"] = {"CHANGED": "1"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    wait_until(lambda: not (before & warm_pids(gw)), 60, 0.2, what="the old warm kernels ended")
    wait_until(lambda: ready(gw) == 2, 90, 0.2, what="a new pool from the changed kernelspec")
    assert "its kernelspec changed" in gw.log()
    kid = start_kernel(gw, POOLED)
    assert run(gw, kid, "import os; print(os.environ.get('CHANGED'))").strip() == "1"
    assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204

    # smaller pool, then none
    spec["metadata"]["kernel_provisioner"]["config"]["pool_size"] = 1
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    wait_until(lambda: ready(gw) == 1 and len(warm_pids(gw)) == 1, 60, 0.2, what="a pool of one")
    remaining = warm_pids(gw)
    (spec_dir / "kernel.json").unlink()
    spec_dir.rmdir()
    wait_until(lambda: not warm_pids(gw), 60, 0.2, what="the pool of the removed kernelspec drained")
    assert "its kernelspec was removed" in gw.log()
    assert not any(alive(pid) for pid in remaining)

    # and on stop: recreate the spec, wait for the pool, stop the gateway, nothing is left
    pooled_spec(jupyter_path, size=2)
    wait_until(lambda: len(warm_pids(gw)) == 2 and ready(gw) == 2, 90, 0.2, what="the pool is back")
    last = warm_pids(gw)
    gw.stop()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in last) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in last), "warm kernels outlived the gateway"
    assert "draining 2 warm kernels: the gateway stops" in gw.log()


def test_a_bad_pool_size_stops_the_gateway_at_start_up(tmp_path, jupyter_path):
    pooled_spec(jupyter_path, size=-1)
    argv = [sys.executable, "-m", "kernel_gateway", "--ip=127.0.0.1", "--port=1", "--auth-token=t"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=clean_env(JUPYTER_PATH=str(jupyter_path), JUPYTER_RUNTIME_DIR=str(tmp_path)))
    assert done.returncode == 2, done
    assert f"kernelspec {POOLED!r}" in done.stderr and "pool_size must be 0 (no pool) or more, not -1" in done.stderr
    assert "Traceback" not in done.stderr
