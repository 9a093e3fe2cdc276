"""Caps on detached sessions: many client-chosen session ids must not keep sockets for the full timeout."""

from __future__ import annotations

import os

from tests.services.client import KernelWS, call, kernel_model, make_msg, start_kernel
from tests.services.gateway import wait_until

SESSIONS = 200
KEEP = 5


def open_fds(gw) -> int:
    return len(os.listdir(f"/proc/{gw.proc.pid}/fd"))


def replayed_before_reply(ws: KernelWS, text: str) -> bool:
    """Whether ``text`` was printed to this session before the reply to a fresh kernel_info_request.

    Buffered output is replayed before anything live, so it is seen before that reply or not at all.
    """
    msg_id = ws.send(make_msg("kernel_info_request", {}))
    reply, seen = ws.recv_until(lambda m: m.get("parent_header", {}).get("msg_id") == msg_id
                                and m["msg_type"] == "kernel_info_reply", 30)
    return any(m["msg_type"] == "stream" and text in m["content"]["text"] for m in seen)


def test_detached_sessions_over_the_cap_are_discarded_and_release_their_sockets(start_gw):
    gw = start_gw(f"--KernelRegistry.max_detached_sessions_per_kernel={KEEP}")
    kernel_id = start_kernel(gw)
    try:
        with KernelWS(gw, kernel_id) as ws:
            ws.run("1", 30)
        wait_until(lambda: kernel_model(gw, kernel_id)["connections"] == 0, 30, what="no connections")
        baseline = open_fds(gw)

        clients = [KernelWS(gw, kernel_id, session_id=f"s-{i}") for i in range(SESSIONS)]
        wait_until(lambda: kernel_model(gw, kernel_id)["connections"] == SESSIONS, 60, what="all sessions attached")
        peak = open_fds(gw)
        assert peak > baseline + 3 * SESSIONS, (baseline, peak)  # each session holds sockets while attached
        for client in clients:
            client.close()
        wait_until(lambda: kernel_model(gw, kernel_id)["connections"] == 0, 60, what="all sessions detached")
        # the kept sessions' sockets (a few each) and nothing for the 195 discarded ones
        settled = wait_until(lambda: (n := open_fds(gw)) <= baseline + 10 * KEEP and n, 60,
                             what=f"descriptors back near the baseline of {baseline}")
        print(f"descriptors: baseline {baseline}, {SESSIONS} sessions attached {peak}, after detaching {settled}")
        log = gw.log()
        assert "discarding detached session s-0: over 5 detached sessions for this kernel" in log
        assert "discarding detached session s-194:" in log
        assert "discarding detached session s-195:" not in log

        with KernelWS(gw, kernel_id) as other:
            other.run("print('while you were away')", 30)
        with KernelWS(gw, kernel_id, session_id=f"s-{SESSIONS - 1}") as kept:
            assert replayed_before_reply(kept, "while you were away"), "a kept session lost its buffered output"
        with KernelWS(gw, kernel_id, session_id="s-0") as discarded:
            assert not replayed_before_reply(discarded, "while you were away")
    finally:
        call(gw, "DELETE", f"/api/kernels/{kernel_id}")


def test_total_cap_counts_detached_sessions_of_every_kernel(start_gw):
    gw = start_gw("--KernelRegistry.max_detached_sessions=3")
    kernels = [start_kernel(gw), start_kernel(gw)]
    try:
        for round_ in range(2):
            for kernel_id in kernels:
                KernelWS(gw, kernel_id, session_id=f"k{kernels.index(kernel_id)}-{round_}").close()
                wait_until(lambda: kernel_model(gw, kernel_id)["connections"] == 0, 30, what="detached")
        # four detached sessions, cap three: the oldest (k0-0) went
        wait_until(lambda: "discarding detached session k0-0: over 3 detached sessions in the gateway" in gw.log(),
                   30, what="the oldest session discarded")
        assert "discarding detached session k1-0" not in gw.log()
    finally:
        for kernel_id in kernels:
            call(gw, "DELETE", f"/api/kernels/{kernel_id}")
