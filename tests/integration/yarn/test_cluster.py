"""Our ApplicationMaster (launchers/yarn) against a real ResourceManager, through the RM REST API.

Each application's AM is ``YarnAmWrapper`` running a small ``python3 -c`` command; the command reports
its pid in a file, so the tests can watch the process itself, and waits for a flag file before it exits.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.services.gateway import wait_until
from tests.services.yarn_cluster import FINAL_STATES, NS_IP, YarnCluster

# argv: pid file, flag file, exit code, a line for stderr. Writes its pid, waits for the flag, exits.
WAITER = ("import os, sys, time; from pathlib import Path; Path(sys.argv[1]).write_text(str(os.getpid())); "
          "[time.sleep(0.1) for _ in iter(lambda: Path(sys.argv[2]).exists(), True)]; "
          "print(sys.argv[4], file=sys.stderr); sys.exit(int(sys.argv[3]))")
# argv: pid file, then a command to start as its own child. Ignores SIGTERM and never exits.
STUBBORN = ("import os, signal, subprocess, sys, time; from pathlib import Path; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); child = subprocess.Popen(sys.argv[2:]); "
            "Path(sys.argv[1]).write_text(str(os.getpid()) + chr(32) + str(child.pid)); time.sleep(3600)")
TIMEOUT = 120  # seconds for any application state change (2 busy cores, JVM start-ups)


def am_command(prefix: str, code: str, *args: str) -> str:
    """The AM container's command: our AM (``prefix``, see conftest) running ``python3 -c code args...``.

    The NodeManager runs it as ``bash -c "<command>"`` without escaping anything; quoting arbitrary
    commands is the provisioner's business, so these tests only use code and arguments that need none.
    """
    for text in (code, *args):
        assert not set(text) & set("\"'$`\\\n"), f"needs quoting: {text!r}"
    return f"{prefix} python3 -c '{code}' {' '.join(args)} 1><LOG_DIR>/stdout 2><LOG_DIR>/stderr"


@pytest.fixture
def submit(yarn_cluster: YarnCluster):
    """Submit an application with a given AM command; every one still live at the end is killed."""
    submitted: list[str] = []

    def _submit(command: str, name: str, memory: int = 256) -> str:
        status, body = yarn_cluster.rest("POST", "/apps/new-application")
        assert status == 200, body
        app_id = body["application-id"]
        submitted.append(app_id)
        status, body = yarn_cluster.rest("POST", "/apps", {
            "application-id": app_id, "application-name": name, "application-type": "KGW-TEST",
            "queue": "default", "max-app-attempts": 1, "resource": {"memory": memory, "vCores": 1},
            "am-container-spec": {"commands": {"command": command}}})
        assert status == 202, body
        return app_id

    yield _submit
    for app_id in submitted:
        if yarn_cluster.app(app_id)["state"] not in FINAL_STATES:
            yarn_cluster.rest("PUT", f"/apps/{app_id}/state", {"state": "KILLED"})


def wait_app(cluster: YarnCluster, app_id: str, predicate, what: str) -> dict:
    def check():
        app = cluster.app(app_id)
        if predicate(app):
            return app
        assert app["state"] not in FINAL_STATES, f"{app_id} ended: {app['state']} {app['diagnostics']}"
        return None
    return wait_until(check, TIMEOUT, 0.2, what=f"{app_id} {what}")


def read_pids(path: Path) -> list[int]:
    wait_until(lambda: path.exists() and path.read_text().strip(), TIMEOUT, 0.1, what=f"pids in {path}")
    return [int(p) for p in path.read_text().split()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_gone(pids: list[int], what: str) -> None:
    wait_until(lambda: not any(alive(p) for p in pids), 30, 0.1, what=f"{what} {pids} to exit")


def test_nodes_running(yarn_cluster: YarnCluster):
    nodes = {n["id"]: n for n in yarn_cluster.running_nodes()}
    assert len(nodes) == len(yarn_cluster.nodes) == 2
    info = yarn_cluster.rest("GET", "/info")[1]["clusterInfo"]
    assert (info["state"], info["haState"], info["hadoopVersion"]) == ("STARTED", "ACTIVE", "3.4.1")
    if yarn_cluster.netns:
        assert f"{NS_IP}:{yarn_cluster.nodes[1].base_port + 1}" in nodes


def test_running_while_command_lives_then_succeeded(yarn_cluster, yarn_am_command, submit, tmp_path):
    pid_file, flag = tmp_path / "pid", tmp_path / "flag"
    app_id = submit(am_command(yarn_am_command, WAITER, str(pid_file), str(flag), "0", "bye"), "waiter")
    [pid] = read_pids(pid_file)
    app = wait_app(yarn_cluster, app_id, lambda a: a["state"] == "RUNNING", "RUNNING")
    assert alive(pid) and app["finalStatus"] == "UNDEFINED"
    assert yarn_cluster.app(app_id)["state"] == "RUNNING"  # still, while the command waits

    flag.touch()
    app = wait_app(yarn_cluster, app_id, lambda a: a["state"] in FINAL_STATES, "to finish")
    assert (app["state"], app["finalStatus"]) == ("FINISHED", "SUCCEEDED"), app["diagnostics"]
    assert "exited with code 0" in app["diagnostics"]
    wait_gone([pid], "the command")


def test_failing_command_reports_exit_code_and_stderr(yarn_cluster, yarn_am_command, submit, tmp_path):
    flag = tmp_path / "flag"
    flag.touch()
    command = am_command(yarn_am_command, WAITER, str(tmp_path / "pid"), str(flag), "3", "kernel-blew-up-ü")
    app_id = submit(command, "failing")
    app = wait_app(yarn_cluster, app_id, lambda a: a["state"] in FINAL_STATES, "to finish")
    assert (app["state"], app["finalStatus"]) == ("FINISHED", "FAILED"), app
    assert "command exited with code 3" in app["diagnostics"]
    assert "kernel-blew-up-ü" in app["diagnostics"]


def test_kill_through_rest_leaves_no_process(yarn_cluster, yarn_am_command, submit, tmp_path):
    pid_file = tmp_path / "pids"
    app_id = submit(am_command(yarn_am_command, STUBBORN, str(pid_file), "sleep", "3600"), "stubborn")
    pids = read_pids(pid_file)  # the command (ignores SIGTERM) and its own child
    wait_app(yarn_cluster, app_id, lambda a: a["state"] == "RUNNING", "RUNNING")

    status, body = yarn_cluster.rest("PUT", f"/apps/{app_id}/state", {"state": "KILLED"})
    assert status in (200, 202), body
    wait_app(yarn_cluster, app_id, lambda a: a["state"] == "KILLED", "KILLED")
    wait_gone(pids, "the command and its child")


def test_am_killed_hard_takes_its_command_along(yarn_cluster, yarn_am_command, submit, tmp_path):
    """SIGKILL of the AM (no shutdown hook runs): the watchdog kills the command's process group."""
    pid_file = tmp_path / "pids"
    app_id = submit(am_command(yarn_am_command, STUBBORN, str(pid_file), "sleep", "3600"), "am-sigkill")
    pids = read_pids(pid_file)
    wait_app(yarn_cluster, app_id, lambda a: a["state"] == "RUNNING", "RUNNING")
    watchdog = _ppid(pids[0])  # the command's parent: the watchdog shell, leader of the command's group
    assert os.getpgid(pids[0]) == watchdog
    am = _ppid(watchdog)
    assert b"YarnAmWrapper" in Path(f"/proc/{am}/cmdline").read_bytes()

    os.kill(am, signal.SIGKILL)
    wait_gone(pids, "the command and its child")
    app = wait_app(yarn_cluster, app_id, lambda a: a["state"] in FINAL_STATES, "to end")
    assert app["finalStatus"] == "FAILED"


def test_usage_error_fails_the_application(yarn_cluster, yarn_am_command, submit):
    command = yarn_am_command.removesuffix("--") + "--bogus 1 -- true 1><LOG_DIR>/stdout 2><LOG_DIR>/stderr"
    app = wait_app(yarn_cluster, submit(command, "usage"), lambda a: a["state"] in FINAL_STATES, "to end")
    assert app["finalStatus"] == "FAILED"
    assert "unknown option --bogus" in app["diagnostics"]


def test_missing_command_fails_the_application(yarn_cluster, yarn_am_command, submit):
    command = f"{yarn_am_command} kgw-no-such-command 1><LOG_DIR>/stdout 2><LOG_DIR>/stderr"
    app = wait_app(yarn_cluster, submit(command, "missing"), lambda a: a["state"] in FINAL_STATES, "to end")
    assert (app["state"], app["finalStatus"]) == ("FINISHED", "FAILED"), app
    assert "command exited with code 127" in app["diagnostics"]
    assert "kgw-no-such-command: not found" in app["diagnostics"]


def test_applications_on_both_nodes(yarn_cluster, yarn_am_command, submit, tmp_path):
    """Two applications that each ask for a whole node's memory must run on different nodes."""
    node = yarn_cluster.running_nodes()[0]
    memory = node["availMemoryMB"] + node["usedMemoryMB"]
    flag = tmp_path / "flag"
    apps = {}
    for i in (1, 2):
        pid_file = tmp_path / f"pid{i}"
        command = am_command(yarn_am_command, WAITER, str(pid_file), str(flag), "0", "bye")
        apps[submit(command, f"whole-node-{i}", memory=memory)] = pid_file
    by_port = {}  # the NM's web port -> the command's pid (hosts read "localhost" on loopback)
    for app_id, pid_file in apps.items():
        app = wait_app(yarn_cluster, app_id, lambda a: a["state"] == "RUNNING", "RUNNING")
        [pid] = read_pids(pid_file)
        by_port[int(app["amHostHttpAddress"].rsplit(":", 1)[1])] = pid
    second = yarn_cluster.nodes[1]
    assert set(by_port) == {n.base_port + 2 for n in yarn_cluster.nodes}

    pid = by_port[second.base_port + 2]
    environ = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
    assert int(environ[b"NM_PORT"]) == second.base_port + 1
    if yarn_cluster.netns:  # the command really runs in the other node's network namespace
        assert environ[b"NM_HOST"].decode() == second.host == NS_IP
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")

    flag.touch()
    for app_id in apps:
        app = wait_app(yarn_cluster, app_id, lambda a: a["state"] in FINAL_STATES, "to finish")
        assert app["finalStatus"] == "SUCCEEDED", app["diagnostics"]


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
