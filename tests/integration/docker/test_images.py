"""Our Docker images on a real engine: the kernel image, the gateway image, and image-bootstrap.

The images are built (once; later runs reuse them while their inputs are unchanged) by
``tests.services.docker_engine.build_images``. Kernels started here run with the host's network and
report to a response listener on 127.0.0.1, so every connection stays on this machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import pytest

from provisioners.image_bootstrap import BOOTSTRAP_SCRIPT
from tests.services.docker_engine import (
    HASH_LABEL,
    REPO,
    TEST_LABEL,
    build_image,
    build_images,
    ensure_docker,
    inputs_hash,
    remove_test_containers,
)
from tests.services.gateway import free_port, wait_until

BOOTSTRAP = "/usr/local/share/kernel-gateway/bootstrap-kernel.sh"
PREFIX = "/usr/local/share/kernel-gateway"
FOREIGN_TAG = "kgw-test-foreign-kernel:dev"
KERNEL_PORTS = "43100..43199"
LABEL_VALUE = "test_images"
#: The Dockerfiles' default BASE; the tests build on kgw-base:bookworm, which must offer the same.
OFFICIAL_BASE = "python:3.11-slim-bookworm"
# An image that is not ours: the base with only python3 + pip, our wheel installed with pip, then
# image-bootstrap (as one would on top of a Jupyter docker-stacks image).
FOREIGN_DOCKERFILE = """\
ARG BASE=kgw-base:bookworm
FROM ${BASE}
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY wheels/ /tmp/wheels/
RUN pip install /tmp/wheels/*.whl && rm -rf /tmp/wheels && kernel-gateway image-bootstrap
"""


# ------------------------------------------------------------------------------------ no engine needed

def test_image_bootstrap_names_missing_modules(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    prefix = tmp_path / "prefix"
    proc = subprocess.run([sys.executable, "-m", "provisioners.image_bootstrap", "--prefix", str(prefix),
                           "--python", str(bare / "bin" / "python")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    for name in ("ipykernel", "pyzmq", "cryptography"):
        assert name in proc.stderr
    assert "Nothing was installed" in proc.stderr and not prefix.exists()


def test_image_bootstrap_installs_launcher_files(tmp_path):
    prefix = tmp_path / "share" / "kernel-gateway"
    proc = subprocess.run([sys.executable, "-m", "provisioners.image_bootstrap", "--prefix", str(prefix)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in prefix.iterdir()) == ["bootstrap-kernel.sh", "kernel-python", "launch_ipykernel.py"]
    assert os.access(prefix / "bootstrap-kernel.sh", os.X_OK)
    assert (prefix / "kernel-python").read_text().strip() == sys.executable
    proc = subprocess.run(["sh", str(prefix / "bootstrap-kernel.sh")], env={"PATH": os.environ["PATH"],
                          "KERNEL_LANGUAGE": "scala"}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "KERNEL_LANGUAGE='scala' is not supported" in proc.stderr


def test_image_bootstrap_is_a_gateway_subcommand():
    """``kernel-gateway image-bootstrap`` (GatewayApp.subcommands) is what Dockerfiles run."""
    from kernel_gateway.app import GatewayApp

    assert "image-bootstrap" in GatewayApp.subcommands, \
        "add 'image-bootstrap' -> provisioners.image_bootstrap.ImageBootstrapApp to GatewayApp.subcommands"


@pytest.mark.parametrize("path", ["docker-compose.yml", "deploy/swarm-stack.yml"])
def test_deployment_files_use_real_variables(path):
    """Every GATEWAY_* variable the compose and stack files set is one the gateway reads."""
    import re

    import yaml

    reference = subprocess.run([sys.executable, "-m", "kernel_gateway", "config-reference"], capture_output=True,
                               text=True, timeout=120, check=True).stdout
    known = set(re.findall(r"`(GATEWAY_[A-Z0-9_]+)`", reference))
    assert "GATEWAY_AUTH_TOKEN" in known
    [gateway] = yaml.safe_load((REPO / path).read_text())["services"].values()
    used = {name for name in gateway["environment"] if name.startswith("GATEWAY_")}
    assert used and used <= known, f"{path} sets variables the gateway does not have: {sorted(used - known)}"
    assert gateway["user"].startswith("1000:") and "/var/run/docker.sock" in str(gateway["volumes"])


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "launchers/images/python/Dockerfile"])
def test_dockerfiles_build_on_the_official_python_image_by_default(dockerfile):
    """`docker build .` works with a registry: BASE defaults to Python's official image, every stage is
    built on BASE, and tini (the entry point, absent from that image) is installed with apt."""
    import re

    text = (REPO / dockerfile).read_text()
    assert re.findall(r"^ARG BASE=(\S+)$", text, re.M) == [OFFICIAL_BASE]
    assert set(re.findall(r"^FROM (\S+)", text, re.M)) == {"${BASE}"}
    assert re.search(r"^RUN apt-get update .*apt-get install [^\n]*\btini\b", text, re.M | re.S)
    assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in text


def test_bootstrap_script_is_packaged():
    """image-bootstrap copies bootstrap-kernel.sh from the installed package: the wheel must carry it."""
    import tomllib

    assert BOOTSTRAP_SCRIPT == REPO / "launchers" / "bootstrap-kernel.sh" and BOOTSTRAP_SCRIPT.is_file()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.sh" in package_data["launchers"]


# ------------------------------------------------------------------------------------ real engine

@pytest.fixture(scope="module")
def engine():
    client = ensure_docker()
    remove_test_containers(client, LABEL_VALUE)  # leftovers of a crashed run
    yield client
    remove_test_containers(client, LABEL_VALUE)
    client.close()


@pytest.fixture(scope="module")
def built(engine) -> dict[str, str]:
    return build_images(engine)


@pytest.fixture
def run(engine):
    """Start labelled containers (detached); every one is removed after the test."""
    started = []

    def start(image: str, **kwargs):
        labels = {TEST_LABEL: LABEL_VALUE, **kwargs.pop("labels", {})}
        container = engine.containers.run(image, detach=True, labels=labels,
                                          name=f"kgw-test-{uuid.uuid4().hex[:10]}", **kwargs)
        started.append(container)
        return container

    yield start
    for container in started:
        try:
            container.remove(force=True)
        except Exception:  # already gone
            pass


def finished(container, timeout: float = 60) -> tuple[int, str]:
    """Exit code and output of a container that is expected to exit by itself."""
    status = container.wait(timeout=timeout)["StatusCode"]
    return status, container.logs().decode(errors="replace")


@pytest.fixture(scope="module")
def foreign_image(engine, built, tmp_path_factory) -> str:
    """The base image + pip-installed wheel of this repository + ``kernel-gateway image-bootstrap``."""
    from kernel_gateway.app import GatewayApp

    if "image-bootstrap" not in GatewayApp.subcommands:
        pytest.fail("kernel-gateway has no image-bootstrap subcommand (GatewayApp.subcommands)")
    digest = inputs_hash(("pyproject.toml", "README.md", "kernel_gateway", "provisioners", "launchers"),
                         extra=FOREIGN_DOCKERFILE + engine.images.get(built["base"]).id)
    context = tmp_path_factory.mktemp("foreign")
    existing = engine.images.list(name=FOREIGN_TAG)
    if not existing or existing[0].labels.get(HASH_LABEL) != digest:
        src = context / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        for name in ("kernel_gateway", "provisioners", "launchers"):
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(context / "wheels"),
                        str(src)], check=True, timeout=600)
        shutil.rmtree(src)
        (context / "Dockerfile").write_text(FOREIGN_DOCKERFILE)
    return build_image(engine, FOREIGN_TAG, context, "Dockerfile", digest, buildargs={"BASE": built["base"]})


@pytest.mark.cluster
def test_local_base_offers_what_the_official_image_offers(built, run):
    """kgw-base stands in for python:3.11-slim-bookworm: Python 3.11 with venv and pip, CA certificates,
    useradd and apt with working sources; and, like it, no tini (so the Dockerfiles' apt step is the
    one a registry build runs)."""
    status, output = finished(run(built["base"], command=["sh", "-c", (
        "python3 -c 'import sys; print(\"python\", *sys.version_info[:2])' && python3 -m venv /tmp/v"
        " && /tmp/v/bin/pip --version >/dev/null && echo venv-pip-ok"
        " && test -s /etc/ssl/certs/ca-certificates.crt && echo ca-ok"
        " && command -v useradd && command -v apt-get && grep -h '^deb ' /etc/apt/sources.list"
        " && if [ -e /usr/bin/tini ]; then echo tini-present; else echo no-tini; fi")]), timeout=120)
    assert status == 0, output
    lines = output.splitlines()
    assert "python 3 11" in lines and "venv-pip-ok" in lines and "ca-ok" in lines, output
    assert any(line.endswith("/useradd") for line in lines) and any(line.endswith("/apt-get") for line in lines)
    assert any(" bookworm main" in line for line in lines), output
    assert lines[-1] == "no-tini", output


@pytest.mark.cluster
def test_kernel_image_rejects_other_languages(built, run):
    status, output = finished(run(built["kernel"], environment={"KERNEL_LANGUAGE": "r"}))
    assert status == 2, output
    assert "KERNEL_LANGUAGE='r' is not supported by this image (supported: python)" in output


@pytest.mark.cluster
def test_kernel_image_needs_the_provisioner_environment(built, run):
    status, output = finished(run(built["kernel"]))
    assert status == 2 and "KERNEL_ID RESPONSE_ADDRESS PUBLIC_KEY KERNEL_LAUNCH_TOKEN" in output, output


@pytest.mark.cluster
def test_kernel_image_user_and_packages(engine, built, run):
    image = engine.images.get(built["kernel"])
    assert image.attrs["Config"]["User"] == "1000:100"
    assert image.attrs["Config"]["Cmd"] == [BOOTSTRAP]
    status, output = finished(run(built["kernel"], entrypoint=["sh", "-c"], command=[
        f"id -u; id -g; ls {PREFIX}; python -c 'import ipykernel, zmq, cryptography; print(\"imports ok\")'"]))
    assert status == 0, output
    lines = output.split()
    assert lines[:2] == ["1000", "100"] and "imports ok" in output
    assert {"bootstrap-kernel.sh", "launch_ipykernel.py"} <= set(lines), output


async def run_kernel_in(image: str, run, command: list[str] | None = None) -> str:
    """Start ``image`` as the container provisioners do; talk to its kernel; return what it printed."""
    from jupyter_client.asynchronous import AsyncKernelClient

    from provisioners.handshake import ResponseListener

    listener = ResponseListener(response_ip="127.0.0.1")
    await listener.start()
    kernel_id = str(uuid.uuid4())
    token = listener.register(kernel_id)
    env = {"KERNEL_ID": kernel_id, "RESPONSE_ADDRESS": f"127.0.0.1:{listener.port}",
           "PUBLIC_KEY": listener.public_key, "PORT_RANGE": KERNEL_PORTS,
           "KERNEL_CLASS_NAME": "ipykernel.ipkernel.IPythonKernel", "KERNEL_LAUNCH_TOKEN": token}
    container = run(image, environment=env, network_mode="host", **({"command": command} if command else {}))
    client = None
    try:
        try:
            info = await asyncio.wait_for(listener.wait(kernel_id), 90)
        except asyncio.TimeoutError:
            container.reload()
            pytest.fail(f"no launcher report in 90s ({container.status}):\n{container.logs().decode()}")
        low, high = (int(p) for p in KERNEL_PORTS.split(".."))
        ports = [info.connection_info[f"{c}_port"] for c in ("shell", "iopub", "stdin", "control", "hb")]
        assert all(low <= p <= high for p in ports + [info.control_port]), (ports, info.control_port)
        assert info.connection_info["ip"] == "127.0.0.1"
        client = AsyncKernelClient()
        client.load_connection_info(info.connection_info)
        client.start_channels()
        await client.wait_for_ready(timeout=60)
        printed: list[str] = []

        def hook(msg):
            if msg["header"]["msg_type"] == "stream":
                printed.append(msg["content"]["text"])

        reply = await client.execute_interactive("import os, sys; print(os.getuid(), sys.executable)",
                                                 output_hook=hook, timeout=60)
        assert reply["content"]["status"] == "ok", reply
        client.shutdown()
        status = await asyncio.get_running_loop().run_in_executor(None, lambda: container.wait(timeout=60))
        assert status["StatusCode"] == 0, container.logs().decode()
        return "".join(printed)
    finally:
        if client is not None:
            client.stop_channels()
        listener.unregister(kernel_id)
        await listener.stop()


@pytest.mark.cluster
async def test_kernel_image_runs_a_kernel(built, run):
    printed = await run_kernel_in(built["kernel"], run)
    assert printed.split() == ["1000", "/opt/kernel/bin/python"]


@pytest.mark.cluster
def test_gateway_image_is_healthy_and_not_root(engine, built, run):
    image = engine.images.get(built["gateway"])
    config = image.attrs["Config"]
    assert config["User"] not in ("", "0", "root") and "8888/tcp" in config["ExposedPorts"]
    token = secrets.token_hex(16)
    port = free_port()
    container = run(built["gateway"], environment={"GATEWAY_AUTH_TOKEN": token},
                    ports={"8888/tcp": ("127.0.0.1", port)})

    def health():
        container.reload()
        state = container.attrs["State"]
        if state["Status"] in ("exited", "dead"):
            pytest.fail(f"gateway container {state['Status']} ({state['ExitCode']}):\n{container.logs().decode()}")
        status = state.get("Health", {}).get("Status")
        if status == "unhealthy":
            pytest.fail(f"gateway container unhealthy: {state['Health']['Log'][-1:]}\n{container.logs().decode()}")
        return status == "healthy"

    wait_until(health, 120, interval=0.5, what="the gateway container to become healthy")

    request = urllib.request.Request(f"http://127.0.0.1:{port}/api", headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and "version" in json.load(response)
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernels", timeout=10)
    assert denied.value.code in (401, 403)

    uid = container.exec_run(["id", "-u"])
    assert uid.exit_code == 0 and uid.output.decode().strip() not in ("", "0"), uid.output
    assert "kernel-gateway --ip=0.0.0.0" in " ".join(container.attrs["Config"]["Cmd"])


@pytest.mark.cluster
def test_image_bootstrap_in_a_foreign_image(foreign_image, run):
    status, output = finished(run(foreign_image, command=["sh", "-c", f"ls {PREFIX}; cat {PREFIX}/kernel-python"]))
    assert status == 0, output
    assert output.split() == ["bootstrap-kernel.sh", "kernel-python", "launch_ipykernel.py", "/usr/bin/python3"]
    status, output = finished(run(foreign_image, command=[BOOTSTRAP], environment={"KERNEL_LANGUAGE": "r"}))
    assert status == 2 and "KERNEL_LANGUAGE='r' is not supported" in output, output


@pytest.mark.cluster
async def test_foreign_image_runs_a_kernel(foreign_image, run):
    printed = await run_kernel_in(foreign_image, run, command=[BOOTSTRAP])
    assert printed.split() == ["0", "/usr/bin/python3"]
