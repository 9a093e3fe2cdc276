"""Docker and Swarm kernels outlive a gateway with ``on_stop=keep`` (issue 10), end to end: real gateway processes,
a real Docker engine, a real SQLite kernel store. The next gateway at the same address serves the kernel under the
same id with its variables, interrupts, restarts and shuts it down; a container killed while no gateway ran is
removed with its record.

The model is ``tests/api/test_reattach.py`` (local kernels); the store fixture and helpers are in tests/services/kernel_store.py.
"""

from __future__ import annotations

import json
import signal

import pytest

from tests.services.client import KernelWS, call, start_kernel
from tests.services import kernel_store
from tests.services.gateway import wait_until
from tests.services.kernel_store import (interrupt_and_restart, no_traceback, not_served, records,
                                         restarts_after_death, run, serve_again, served_after_restart, stop_keeping)

from . import test_docker_reattach
from .conftest import CONTAINER_PORTS, write_container_spec
from .test_docker_reattach import SWARM, kernel_ids, kernel_objects, remove_all

pytestmark = pytest.mark.cluster

keep = kernel_store.keep  # the same fixture: a store key and a SQLite store under tmp_path
engine = test_docker_reattach.engine  # the Docker client; a Swarm manager for the Swarm case
interrupt_mode = kernel_store.interrupt_mode  # 'message' unless a test parametrizes 'signal'


@pytest.fixture
def start_keeping(start_gw, keep, engine, images, instance, provisioner, tmp_path, interrupt_mode):
    """Start a gateway that keeps its kernels and has the spec 'container' for ``provisioner``."""
    config = {"image": images["kernel"], "port_range": CONTAINER_PORTS, "instance_name": instance}
    if provisioner == SWARM:  # the task joins the host network so this process, outside any overlay, reaches it
        config.update(network="host", response_host="127.0.0.1")
    write_container_spec(tmp_path / "data", "container", provisioner, config)
    spec_file = tmp_path / "data" / "kernels" / "container" / "kernel.json"
    spec_file.write_text(json.dumps({**json.loads(spec_file.read_text()), "interrupt_mode": interrupt_mode}))
    env = {**keep, "JUPYTER_PATH": str(tmp_path / "data")}
    yield lambda port=None: start_gw(env=env, port=port, timeout=60)
    remove_all(engine, provisioner, instance)  # a failed test leaves nothing behind


def running(engine, provisioner: str, instance: str) -> bool:
    """Whether the one kernel container runs (Swarm: the service's task)."""
    [item] = kernel_objects(engine, provisioner, instance)
    if provisioner == SWARM:
        return any(t["Status"]["State"] == "running" for t in item.tasks())
    item.reload()
    return item.status == "running"


def kill(engine, provisioner: str, item) -> None:
    """Kill the kernel's container (Swarm: its task's container, as a crash would end it) and wait for its exit."""
    if provisioner == SWARM:
        [task] = [t for t in item.tasks() if t["Status"]["State"] == "running"]
        item = engine.containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
    item.kill()
    wait_until(lambda: (item.reload() or item).status == "exited", 60, 0.5, what="the kernel's container exited")


@pytest.mark.parametrize("interrupt_mode", ["signal"])
@pytest.mark.parametrize("provisioner, sig", [
    ("docker-provisioner", signal.SIGTERM), ("docker-provisioner", signal.SIGKILL), (SWARM, signal.SIGTERM)],
    ids=["docker-sigterm", "docker-sigkill", "swarm-sigterm"])
def test_container_kernel_outlives_the_gateway_and_is_served_again(start_keeping, keep, engine, instance,
                                                                   provisioner, sig):
    first = start_keeping()
    kid = start_kernel(first, "container", env={"KERNEL_USERNAME": "alice"}, timeout=120)
    run(first, kid, "kept = 41 + 1")
    [before] = [o.id for o in kernel_objects(engine, provisioner, instance)]
    old_ws = KernelWS(first, kid)

    stop_seconds = stop_keeping(first, sig)
    assert running(engine, provisioner, instance), "the kernel's container ended with the gateway"

    second, ready_seconds, answer_seconds = serve_again(start_keeping, first, kid, old_ws)
    try:
        print(f"\nTIMING {provisioner} {sig.name}: gateway stopped in {stop_seconds:.2f}s; the new one ready after "
              f"{ready_seconds:.2f}s, the kernel answered after {answer_seconds:.2f}s")
        assert [o.id for o in kernel_objects(engine, provisioner, instance)] == [before], "served by the same container"
        interrupt_and_restart(second, kid, "alice")  # the signal goes through the launcher's control port
        assert kernel_ids(engine, provisioner, instance) == [kid]
        if provisioner != SWARM:  # a Swarm restart replaces the service's task under the same name
            [after] = [o.id for o in kernel_objects(engine, provisioner, instance)]
            assert after != before, "the restart ran a fresh container"

        assert call(second, "DELETE", f"/api/kernels/{kid}")[0] == 204
        wait_until(lambda: not kernel_objects(engine, provisioner, instance), 60, 0.5,
                   what="no container or service left after the shutdown")
    finally:
        second.stop()
    assert records(keep) == []
    no_traceback(first, second)


@pytest.mark.parametrize("provisioner, interrupt_mode", [
    ("docker-provisioner", "message"), (SWARM, "message"),
    ("docker-provisioner", "signal")])
def test_a_container_killed_while_no_gateway_ran_is_removed(start_keeping, keep, engine, instance, provisioner):
    first = start_keeping()
    dead = start_kernel(first, "container", timeout=120)
    [dead_item] = kernel_objects(engine, provisioner, instance)
    alive = start_kernel(first, "container", timeout=120)
    first.stop()
    kill(engine, provisioner, dead_item)

    second = start_keeping(port=first.port)
    try:
        not_served(second, dead, alive)
        wait_until(lambda: kernel_ids(engine, provisioner, instance) == [alive], 60, 0.5,
                   what="the dead kernel's container removed")
        # the new gateway's first start reaps what earlier runs of this instance left, but not a kept kernel
        fresh = start_kernel(second, "container", timeout=120)
        assert kernel_ids(engine, provisioner, instance) == sorted([alive, fresh])
        for kid in (alive, fresh):
            assert call(second, "DELETE", f"/api/kernels/{kid}")[0] == 204
        wait_until(lambda: not kernel_objects(engine, provisioner, instance), 60, 0.5, what="nothing left")
    finally:
        second.stop()
    assert records(keep) == []
    no_traceback(first, second)


@pytest.mark.parametrize("provisioner", ["docker-provisioner", SWARM])
def test_a_reattached_kernel_that_dies_is_restarted_and_kept_again(start_keeping, keep, engine, instance, provisioner):
    """The new gateway watches the re-attached container (Swarm: service) with its shared watch: its death is
    noticed and the kernel restarted, and the record then names the new one, so a third gateway re-attaches it."""
    first = start_keeping()
    kid = start_kernel(first, "container", env={"KERNEL_USERNAME": "alice"}, timeout=120)
    first.stop()
    second = start_keeping(port=first.port)
    third = None
    try:
        [item] = kernel_objects(engine, provisioner, instance)
        restarts_after_death(second, kid, lambda: kill(engine, provisioner, item))
        if provisioner != SWARM:
            assert [o.id for o in kernel_objects(engine, provisioner, instance)] != [item.id]
        second.stop()
        assert running(engine, provisioner, instance)
        third = served_after_restart(start_keeping, first, kid, "alice")
        assert call(third, "DELETE", f"/api/kernels/{kid}")[0] == 204
        wait_until(lambda: not kernel_objects(engine, provisioner, instance), 60, 0.5, what="nothing left")
    finally:
        for gw in (second, third):
            if gw is not None:
                gw.stop()
    assert records(keep) == []
    no_traceback(first, second, third)
