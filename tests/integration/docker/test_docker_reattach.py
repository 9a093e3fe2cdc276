"""A later gateway re-attaches to Docker and Swarm kernels from their stored provisioner info (issue 10).

As in the SSH re-attach tests (whose helpers these reuse): a first ``AsyncKernelManager`` starts the kernel, a
second one, built as a new gateway builds it from a kernel record, must then run code, interrupt through the
launcher's control port, and shut down leaving nothing; a kernel that died while no gateway ran is reported
exited at once.
"""

from __future__ import annotations

import pytest

from provisioners.docker import DockerHost
from tests.integration.ssh.test_ssh_reattach import (
    eventually, exited, interrupt_by_signal, reattach, run_code, stored_record)
from tests.services.gateway import wait_until

from .conftest import CONTAINER_PORTS, containers_of, services_of, write_container_spec

pytestmark = pytest.mark.cluster

SWARM = "docker-swarm-provisioner"


@pytest.fixture
def engine(request):
    """The Docker client; for Swarm, after making sure this engine is a Swarm manager."""
    return request.getfixturevalue("swarm" if request.node.callspec.params["provisioner"] == SWARM else "docker_client")


@pytest.fixture
def spec(tmp_path, images, instance, provisioner, monkeypatch) -> str:
    config = {"image": images["kernel"], "port_range": CONTAINER_PORTS, "instance_name": instance}
    if provisioner == SWARM:  # the task joins the host network so this process, outside any overlay, reaches it
        config.update(network="host", response_host="127.0.0.1")
    write_container_spec(tmp_path / "data", "container", provisioner, config)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "data"))
    return "container"


def kernel_objects(engine, provisioner: str, instance: str) -> list:
    return services_of(engine, instance) if provisioner == SWARM else containers_of(engine, instance)


def kernel_ids(engine, provisioner: str, instance: str) -> list[str]:
    return sorted(o.attrs["Spec"]["Labels"]["kernel_gateway.kernel_id"] if provisioner == SWARM
                  else o.labels["kernel_gateway.kernel_id"] for o in kernel_objects(engine, provisioner, instance))


def new_gateway(kernel_id: str, instance: str) -> None:
    """What a new gateway process knows: nothing of the kernel, and this instance's leftovers not yet reaped."""
    host = DockerHost.instance()
    host.forget(kernel_id)
    host.reaped.discard(instance)


def remove_all(engine, provisioner: str, instance: str) -> None:
    for item in kernel_objects(engine, provisioner, instance):
        item.remove(**({} if provisioner == SWARM else {"force": True}))


@pytest.mark.parametrize("provisioner", ["docker-provisioner", SWARM])
@pytest.mark.asyncio(loop_scope="session")  # the response listener and the Docker watch are per process
async def test_reattached_kernel_runs_interrupts_and_shuts_down(spec, engine, provisioner, instance):
    from jupyter_client.manager import AsyncKernelManager

    first = AsyncKernelManager(kernel_name=spec)
    await first.start_kernel()
    second = None
    try:
        await run_code(first, "x = 41")
        info, connection = await stored_record(first)
        assert info["object_id"] and info["control_key"] and info["control_port"], info
        new_gateway(first.kernel_id, instance)
        later = await reattach(spec, first.kernel_id, info, connection, inline=True)
        assert later.has_kernel and await later.is_alive()

        # the new gateway's first start reaps what an earlier run left, but never a re-attached kernel
        second = AsyncKernelManager(kernel_name=spec)
        await second.start_kernel()
        assert kernel_ids(engine, provisioner, instance) == sorted([first.kernel_id, second.kernel_id])
        await second.shutdown_kernel(now=True)

        assert (await run_code(later, "x += 1; print(x)")).strip() == "42"
        await interrupt_by_signal(later)
        assert (await run_code(later, "print(x)")).strip() == "42"
        await later.shutdown_kernel()
        assert not later.has_kernel
        wait_until(lambda: not kernel_objects(engine, provisioner, instance), 60, 0.5,
                   what="no container or service left after the re-attached kernel's shutdown")
    finally:
        await first.cleanup_resources()
        if second is not None:
            await second.cleanup_resources()
        remove_all(engine, provisioner, instance)


@pytest.mark.parametrize("provisioner, how", [
    ("docker-provisioner", "kill"), ("docker-provisioner", "remove"), (SWARM, "remove")])
@pytest.mark.asyncio(loop_scope="session")
async def test_a_kernel_that_died_while_no_gateway_ran(spec, engine, provisioner, how, instance):
    from jupyter_client.manager import AsyncKernelManager

    first = AsyncKernelManager(kernel_name=spec)
    await first.start_kernel()
    try:
        info, connection = await stored_record(first)
        new_gateway(first.kernel_id, instance)
        [item] = kernel_objects(engine, provisioner, instance)
        item.kill() if how == "kill" else item.remove(**({} if provisioner == SWARM else {"force": True}))
        if how == "kill":
            wait_until(lambda: (item.reload() or item).status == "exited", 60, 0.5, what="the container exited")
        later = await reattach(spec, first.kernel_id, info, connection)
        status = await later.provisioner.poll()
        # removed: -1 from the listing, or 137 when this process's events stream saw the forced removal's kill
        assert status == 137 if how == "kill" else status in (-1, 137), status
        assert not await later.is_alive()
        await later.shutdown_kernel(now=True)  # what a gateway does with a dead record: clean up, no error
        wait_until(lambda: not kernel_objects(engine, provisioner, instance), 60, 0.5, what="nothing left")
    finally:
        await first.cleanup_resources()
        remove_all(engine, provisioner, instance)


@pytest.mark.parametrize("provisioner", ["docker-provisioner", SWARM])
@pytest.mark.asyncio(loop_scope="session")
async def test_removal_behind_a_reattached_kernel_is_noticed(spec, engine, provisioner, instance):
    """The shared watch (events stream; for Swarm the task query, then a service listing) covers re-attached kernels."""
    from jupyter_client.manager import AsyncKernelManager

    first = AsyncKernelManager(kernel_name=spec)
    await first.start_kernel()
    try:
        info, connection = await stored_record(first)
        new_gateway(first.kernel_id, instance)
        later = await reattach(spec, first.kernel_id, info, connection)
        assert await later.is_alive()
        remove_all(engine, provisioner, instance)
        await eventually(lambda: exited(later), 60, "the removal noticed")
        await later.shutdown_kernel(now=True)
    finally:
        await first.cleanup_resources()
        remove_all(engine, provisioner, instance)
