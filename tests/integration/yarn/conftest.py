"""A real YARN cluster (ResourceManager + two NodeManagers) for the session, and our ApplicationMaster jar.

Every test that uses ``yarn_cluster`` is marked ``cluster`` (``-m "not cluster"`` skips them).
``KGW_YARN_PORT_BASE`` (18030) and ``KGW_YARN_WEB_PORT`` (18088) move the cluster's ports, e.g. away
from a cluster started by hand from the recipe, which uses the same defaults on 127.0.0.1;
``KGW_YARN_NETNS`` = 0 keeps node 2 on loopback, 1 requires a network namespace (default: when possible).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from launchers.yarn import AM_MAIN_CLASS, build_am_jar
from tests.services.yarn_cluster import YarnCluster, log, start_cluster


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if "yarn_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def yarn_cluster(tmp_path_factory) -> YarnCluster:
    """RM at ``rm_url`` (127.0.0.1:18088, or 10.198.7.1:18088 when node 2 runs in a network namespace)."""
    netns = {"0": False, "1": True}.get(os.environ.get("KGW_YARN_NETNS", ""))
    cluster = start_cluster(tmp_path_factory.mktemp("yarn"), nodes=2, netns=netns,
                            port_base=int(os.environ.get("KGW_YARN_PORT_BASE", "18030")),
                            web_port=int(os.environ.get("KGW_YARN_WEB_PORT", "18088")))
    yield cluster
    cluster.stop()
    log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in cluster.timings.items()))


@pytest.fixture(scope="session")
def yarn_am_jar() -> Path:
    """The ApplicationMaster jar (launchers/yarn), built once per source hash."""
    return build_am_jar()


@pytest.fixture(scope="session")
def yarn_am_command(yarn_cluster: YarnCluster, yarn_am_jar: Path) -> str:
    """The start of an AM container command that runs our AM; append the launcher's argv (quoted for
    ``bash -c "..."``) and the ``1><LOG_DIR>/stdout 2><LOG_DIR>/stderr`` redirections."""
    return (f"{{{{JAVA_HOME}}}}/bin/java -Xmx64m -cp '{yarn_am_jar}:{yarn_cluster.hadoop_classpath}' "
            f"{AM_MAIN_CLASS} --")
