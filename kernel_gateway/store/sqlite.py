"""The embedded store: one SQLite file (mode 0600, WAL, synchronous writes) owned by one gateway at a time."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path

from .base import KernelStore, StoreUnavailable
from .crypto import RecordCipher

__all__ = ["SQLiteKernelStore"]


class SQLiteKernelStore(KernelStore):
    """Records in a SQLite file; a second gateway on the same file is refused (an ``flock`` beside it)."""

    name = "sqlite"

    def __init__(self, path: str | Path, cipher: RecordCipher) -> None:
        super().__init__(cipher)
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    def describe(self) -> str:
        return f"SQLite {self.path}"

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StoreUnavailable(f"kernel store ({self.describe()}) is in use by another gateway; give each "
                                   "gateway its own file, or use PostgreSQL for replicas") from None
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))  # created private, before SQLite opens it
            os.chmod(self.path, 0o600)
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged record survives a power cut, not only a crash
            db.execute("CREATE TABLE IF NOT EXISTS kernels (kernel_id TEXT PRIMARY KEY, record BLOB NOT NULL, "
                       "updated REAL NOT NULL)")
        except BaseException:
            os.close(lock_fd)
            raise
        for suffix in ("-wal", "-shm"):  # SQLite creates them with the process umask
            if os.path.exists(f"{self.path}{suffix}"):
                os.chmod(f"{self.path}{suffix}", 0o600)
        self._db, self._lock_fd = db, lock_fd
        return db

    def _put(self, kernel_id: str, blob: bytes) -> None:
        self._connect().execute("INSERT INTO kernels (kernel_id, record, updated) VALUES (?, ?, ?) ON CONFLICT(kernel_id) "
                                "DO UPDATE SET record = excluded.record, updated = excluded.updated",
                                (kernel_id, blob, time.time()))

    def _get(self, kernel_id: str) -> bytes | None:
        row = self._connect().execute("SELECT record FROM kernels WHERE kernel_id = ?", (kernel_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def _delete(self, kernel_id: str) -> None:
        self._connect().execute("DELETE FROM kernels WHERE kernel_id = ?", (kernel_id,))

    def _all(self) -> list[tuple[str, bytes]]:
        return [(k, bytes(r)) for k, r in self._connect().execute("SELECT kernel_id, record FROM kernels ORDER BY updated")]

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
