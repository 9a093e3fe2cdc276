"""An attacker for the response listener, run as its own process by test_listener_abuse.py (loopback only).

It holds ``--idle`` connections open that never send a byte, spread over source addresses
127.0.1.x (``--per-source`` each, the listener's per-peer limit), re-opening each one the listener
closes; and it floods junk: connections from 127.0.2.x that send random bytes, and connections
from the idle sources beyond their limit. It prints ``ready`` once every idle connection is open,
and stops when stdin closes or ``--seconds`` pass, printing what it did as JSON. Bounded in count
and time; only 127.0.0.0/8 is ever a target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import threading
import time


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--per-source", type=int, default=16)
    parser.add_argument("--junk-workers", type=int, default=16)
    parser.add_argument("--max-junk", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    deadline = time.monotonic() + args.seconds
    stop = asyncio.Event()
    stats = {"idle_opened": 0, "idle_reopened": 0, "junk": 0}
    opened = asyncio.Semaphore(0)

    async def connect(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", args.port, local_addr=(source, 0))

    async def hold(index: int) -> None:
        source = f"127.0.1.{index // args.per_source + 1}"
        first = True
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                reader, writer = await connect(source)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            if first:
                stats["idle_opened"] += 1
                opened.release()
                first = False
            else:
                stats["idle_reopened"] += 1
            try:
                await reader.read()  # until the listener closes it
            except OSError:
                pass
            writer.close()

    async def junk(worker: int) -> None:
        n = 0
        while not stop.is_set() and time.monotonic() < deadline and stats["junk"] < args.max_junk:
            n += 1
            over_limit = n % 2 == 0  # every other one from an idle source, which is at its limit
            source = f"127.0.1.{n % (args.idle // args.per_source) + 1}" if over_limit else f"127.0.2.{worker + 1}"
            stats["junk"] += 1
            try:
                reader, writer = await connect(source)
                writer.write(b"\x00" + os.urandom(63))
                await writer.drain()
                await asyncio.wait_for(reader.read(), 10)
                writer.close()
            except (OSError, asyncio.TimeoutError):
                pass  # the listener closed it first (a reset): what a flood gets

    loop = asyncio.get_running_loop()

    def stdin_closed() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)

    holders = [asyncio.ensure_future(hold(i)) for i in range(args.idle)]
    threading.Thread(target=stdin_closed, daemon=True).start()  # a daemon: it must not hold up the exit
    for _ in range(args.idle):
        await opened.acquire()
    print("ready", flush=True)
    flood = [asyncio.ensure_future(junk(w)) for w in range(args.junk_workers)]
    try:
        await asyncio.wait_for(stop.wait(), max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        pass
    stop.set()
    for task in holders + flood:
        task.cancel()
    await asyncio.gather(*holders, *flood, return_exceptions=True)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
