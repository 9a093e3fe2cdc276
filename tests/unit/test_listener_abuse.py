"""Nobody who can merely reach the response listener delays a genuine launcher (issue 7).

An attacker process holds 1,000 idle connections open and floods junk while 10 launchers report
with the real launcher code (encrypt, send, verify the ack, retry); each must be acknowledged
within 2 s. Loopback only, bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from provisioners.handshake import ResponseListener
from tests.unit.test_handshake import launcher, payload, until

IDLE = 1000
LAUNCHERS = 10
FLOOD = Path(__file__).with_name("_listener_flood.py")


@pytest.fixture
def many_descriptors():
    """Room for 1,000 connections in this process (the listener's ends) and the cap the listener derives from it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * IDLE:
        pytest.skip(f"the open-file hard limit {hard} is too low for {IDLE} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_idle_connections_and_a_junk_flood_do_not_delay_launchers(many_descriptors, caplog):
    caplog.set_level(logging.INFO, logger="provisioners.handshake")
    listener = ResponseListener(response_ip="127.0.0.1")  # the defaults: 5 s deadline, 16 per peer, 4096 in all
    await listener.start()
    attacker = await asyncio.create_subprocess_exec(
        sys.executable, str(FLOOD), f"--port={listener.port}", f"--idle={IDLE}", "--seconds=90",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    pool = ThreadPoolExecutor(LAUNCHERS)  # one thread per launcher, as each runs in its own process
    try:
        ready = await asyncio.wait_for(attacker.stdout.readline(), 60)
        assert ready.strip() == b"ready", ready
        await until(lambda: len(listener._serving) >= IDLE, 30, f"{IDLE} idle connections held by the listener")
        dropped = lambda: sum(listener._drops.suppressed.values())  # noqa: E731
        await until(lambda: dropped() >= 500, 60, "the junk flood under way")
        dropped_before = dropped()

        def launch(index: int, kernel_id: str, token: str) -> float:
            time.sleep(index * 0.1)  # pacing, not synchronisation: the launchers start over a second of flood
            started = time.monotonic()
            launcher.send_connection_info(f"127.0.0.1:{listener.port}", payload(kernel_id, token), kernel_id,
                                          listener.public_key, 30.0)
            return time.monotonic() - started

        kernels = {str(uuid.uuid4()): None for _ in range(LAUNCHERS)}
        tokens = {kid: listener.register(kid) for kid in kernels}
        loop = asyncio.get_running_loop()
        held_during = len(listener._serving)
        durations = await asyncio.gather(*(loop.run_in_executor(pool, launch, i, kid, tokens[kid]) for i, kid in enumerate(kernels)))
        held_after = len(listener._serving)
        dropped_during = dropped() - dropped_before
        infos = await asyncio.wait_for(asyncio.gather(*(listener.wait(kid) for kid in kernels)), 5)
        assert [info.pid for info in infos] == [42] * LAUNCHERS
        assert max(durations) < 2.0, durations
        assert min(held_during, held_after) >= IDLE and dropped_during > 0  # the attack was on the whole time
    finally:
        attacker.stdin.close()
        out, _ = await asyncio.wait_for(attacker.communicate(), 60)
        pool.shutdown()
        await listener.stop()
    stats = json.loads(out.decode().strip().splitlines()[-1])
    assert stats["idle_opened"] == IDLE and stats["junk"] >= 500, stats
    drops = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(drops) <= 8, drops  # one line per reason and a summary, not one per connection
    print(f"launch durations: {', '.join(f'{d:.3f}' for d in sorted(durations))} s; "
          f"{dropped_during} junk connections dropped meanwhile; attacker: {stats}")
