"""Per-kernel output backlog: each kernel message stored once, read by every session at its own pace.

A :class:`Backlog` holds the messages of one kernel that some session has not read yet: iopub
messages for everyone, replies for the one session they are addressed to. Each session keeps a
cursor (the sequence number of the next message it reads), so fifty clients cost one copy of the
output, not fifty. Memory is bounded in bytes per kernel and across all kernels
(:class:`BridgeLimits`): when a bound is passed, the slowest session skips its oldest messages
(its websocket, if one is attached, is closed so it can reconnect and resume), and it is told
how many it lost when it comes back.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Iterable

from .frames import KernelMessage

if TYPE_CHECKING:
    from .channels import KernelBridge
    from .session import ChannelSession

__all__ = ["Backlog", "BridgeLimits", "Encoder", "Entry"]

#: Makes the websocket payload of a message: ``(data, is_binary)``.
Encoder = Callable[[KernelMessage], "tuple[bytes, bool]"]

log = logging.getLogger("kernel_gateway.bridge")

#: Bytes counted per message on top of its parts (the Python objects that carry it).
MESSAGE_OVERHEAD = 300

#: When a bound is passed, shed down to this fraction of it, so shedding runs in batches, not per message.
SHED_TO = 0.875


class BridgeLimits:
    """Bounds shared by the bridges of all kernels, and the totals they are checked against.

    One instance per gateway (the kernel registry makes it); 0 for a bound means no bound.
    """

    def __init__(
        self,
        kernel_bytes: int = 64 * 2**20,
        total_bytes: int = 512 * 2**20,
        max_messages: int = 100_000,
        detached_per_kernel: int = 0,
        detached_total: int = 0,
        requests_in_flight: int = 0,
    ) -> None:
        self.kernel_bytes = kernel_bytes
        self.total_bytes = total_bytes
        self.max_messages = max_messages
        self.detached_per_kernel = detached_per_kernel
        self.detached_total = detached_total
        self.requests_in_flight = requests_in_flight
        self.used_bytes = 0
        self.bridges: set[KernelBridge] = set()

    def shed_globally(self) -> None:
        """Past ``total_bytes``: shed the kernel whose oldest unread message is the oldest of all, until under."""
        target = int(self.total_bytes * SHED_TO)
        while self.used_bytes > target:
            backlogs = [b.backlog for b in self.bridges if b.backlog.count]
            if not backlogs:
                return
            oldest = min(backlogs, key=lambda b: b.oldest_time())
            before = self.used_bytes
            oldest.shed(max(oldest.nbytes - (self.used_bytes - target), 0), oldest.count, "the gateway's output buffer")
            if self.used_bytes >= before:
                return

    def detached(self) -> Iterable[ChannelSession]:
        """Every retained session that has no websocket, of every kernel."""
        for bridge in self.bridges:
            yield from bridge.detached_sessions()


class Entry:
    """One message in a backlog: for everyone (``target`` None) or for the session ``target``."""

    __slots__ = ("msg", "target", "size", "born", "frames")

    def __init__(self, msg: KernelMessage, target: str | None) -> None:
        self.msg = msg
        self.target = target
        self.size = sum(len(p) for p in msg.parts) + MESSAGE_OVERHEAD
        self.born = time.monotonic()
        self.frames: dict[str, tuple[bytes, bool]] | None = None

    def is_for(self, session_id: str) -> bool:
        return self.target is None or self.target == session_id


class Backlog:
    """The unread messages of one kernel, bounded in bytes and count; sessions read them through cursors."""

    def __init__(self, limits: BridgeLimits, readers: dict[str, ChannelSession], log: logging.LoggerAdapter) -> None:
        self.limits = limits
        self.readers = readers  # the bridge's sessions, by id
        self.log = log
        self._items: list[Entry | None] = []
        self._head = 0  # index in _items of the first live entry
        self.first = 0  # sequence number of that entry
        self.nbytes = 0
        # messages before this sequence number keep no encoded frames: every attached client has read them,
        # and a detached one that comes back encodes its own (else detached sessions would hold two copies)
        self._bare = 0

    @property
    def count(self) -> int:
        return len(self._items) - self._head

    @property
    def end(self) -> int:
        """Sequence number the next message will get (where a new session starts reading)."""
        return self.first + self.count

    def oldest_time(self) -> float:
        entry = self._items[self._head]
        return entry.born if entry is not None else time.monotonic()

    def _entry(self, seq: int) -> Entry:
        entry = self._items[self._head + seq - self.first]
        assert entry is not None
        return entry

    def append(self, msg: KernelMessage, target: str | None = None) -> None:
        """Store ``msg`` for every session (or for ``target`` only), then enforce the bounds."""
        entry = Entry(msg, target)
        self._items.append(entry)
        self._grow(entry.size)
        limits = self.limits
        if (limits.kernel_bytes and self.nbytes > limits.kernel_bytes) or (
            limits.max_messages and self.count > limits.max_messages
        ):
            self.shed(
                int(limits.kernel_bytes * SHED_TO) if limits.kernel_bytes else self.nbytes,
                int(limits.max_messages * SHED_TO) if limits.max_messages else self.count,
                "the kernel's output buffer",
            )
        if limits.total_bytes and limits.used_bytes > limits.total_bytes:
            limits.shed_globally()

    def _grow(self, size: int) -> None:
        self.nbytes += size
        self.limits.used_bytes += size

    def _frame(self, entry: Entry, key: str, encode: Encoder, share: bool) -> tuple[bytes, bool]:
        """The websocket payload of ``entry`` in encoding ``key``: made once, shared by every client using it
        (unless not ``share``: the message is addressed to one session, or every other client has read it)."""
        if not share or entry.target is not None:
            return encode(entry.msg)
        frames = entry.frames
        if frames is None:
            frames = entry.frames = {}
        found = frames.get(key)
        if found is None:
            found = frames[key] = encode(entry.msg)
            entry.size += len(found[0])
            self._grow(len(found[0]))
        return found

    def pending(self, session: ChannelSession) -> int:
        """How many messages ``session`` has not read (its own and everyone's)."""
        return sum(1 for seq in range(session.cursor, self.end) if self._entry(seq).is_for(session.session_id))

    def read(self, session: ChannelSession, max_bytes: int, first: bool, key: str,
             encode: Encoder) -> list[tuple[bytes, bool]]:
        """Take the next messages for ``session`` that fit in ``max_bytes`` (and one that does not, if
        ``first``: the client has nothing unsent), as websocket payloads ``(data, is_binary)`` in
        encoding ``key`` (``encode`` makes one from a message)."""
        taken: list[tuple[bytes, bool]] = []
        size = 0
        seq, end, sid = session.cursor, self.end, session.session_id
        while seq < end:
            entry = self._entry(seq)
            if entry.target is None or entry.target == sid:
                if size + entry.size > max_bytes and (taken or not first):
                    break
                payload = self._frame(entry, key, encode, seq >= self._bare)
                taken.append(payload)
                size += len(payload[0])
            seq += 1
        session.cursor = seq
        self.trim()  # after encoding: a payload cached on an entry is counted while the entry is kept
        return taken

    def trim(self) -> None:
        """Forget the messages every session that keeps output has read, and the frames every attached one has."""
        self._drop_until(min((s.cursor for s in self.readers.values() if s.keeps_output), default=self.end))
        attached = min((s.cursor for s in self.readers.values() if s.sink is not None), default=self.end)
        seq, freed = max(self._bare, self.first), 0
        while seq < attached:
            entry = self._entry(seq)
            if entry.frames:
                size = sum(len(data) for data, _ in entry.frames.values())
                entry.size -= size
                freed += size
                entry.frames = None
            seq += 1
        self._bare = max(self._bare, attached)
        self.nbytes -= freed
        self.limits.used_bytes -= freed

    def _drop_until(self, seq: int) -> None:
        items = self._items
        freed = 0
        while self.first < seq and self._head < len(items):
            freed += items[self._head].size  # type: ignore[union-attr]
            items[self._head] = None
            self._head += 1
            self.first += 1
        if freed:
            self.nbytes -= freed
            self.limits.used_bytes -= freed
        if self._head > 1024 and self._head * 2 > len(items):
            del items[: self._head]
            self._head = 0

    def shed(self, max_bytes: int, max_count: int, what: str) -> None:
        """Make the slowest sessions skip their oldest messages until the backlog fits the bounds."""
        self.trim()
        while self.count and (self.nbytes > max_bytes or self.count > max_count):
            keepers = [s for s in self.readers.values() if s.keeps_output]
            low = min((s.cursor for s in keepers), default=self.end)
            if low > self.first:
                self._drop_until(low)
                continue
            nxt = min((s.cursor for s in keepers if s.cursor > low), default=self.end)
            stop, freed = low, 0
            while stop < nxt and (self.nbytes - freed > max_bytes or self.count - (stop - low) > max_count):
                freed += self._entry(stop).size
                stop += 1
            for session in [s for s in keepers if s.cursor == low]:
                lost = sum(1 for seq in range(low, stop) if self._entry(seq).is_for(session.session_id))
                session.skip(stop, lost, what)
            self._drop_until(min((s.cursor for s in self.readers.values() if s.keeps_output), default=self.end))

    def clear(self) -> None:
        self._drop_until(self.end)
