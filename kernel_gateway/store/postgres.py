"""The shared store for replicas: one PostgreSQL table, reached with psycopg 3 (the ``postgresql`` extra)."""

from __future__ import annotations

import time
from typing import Any

from .base import KernelStore, StoreUnavailable
from .crypto import RecordCipher

__all__ = ["PostgresKernelStore"]

_SCHEMA = ("CREATE TABLE IF NOT EXISTS kernel_gateway_kernels (kernel_id TEXT PRIMARY KEY, record BYTEA NOT NULL, "
           "updated DOUBLE PRECISION NOT NULL)",
           "CREATE TABLE IF NOT EXISTS kernel_gateway_activity (kernel_id TEXT PRIMARY KEY REFERENCES "
           "kernel_gateway_kernels ON DELETE CASCADE, last_activity DOUBLE PRECISION NOT NULL)",
           "CREATE TABLE IF NOT EXISTS kernel_gateway_leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
           "expires DOUBLE PRECISION NOT NULL)")
#: the database's clock, so that replicas' clocks never decide who holds a lease
_NOW = "extract(epoch from clock_timestamp())"


class PostgresKernelStore(KernelStore):
    """Records in ``kernel_gateway_kernels``; a lost connection is opened again by the next call."""

    name = "postgresql"
    shared = True

    def __init__(self, dsn: str, cipher: RecordCipher, connect_timeout: float = 5.0) -> None:
        super().__init__(cipher)
        try:
            import psycopg
        except ImportError:
            raise StoreUnavailable("the PostgreSQL kernel store needs psycopg: "
                                   "pip install 'kernel-gateway-server[postgresql]'") from None
        self._psycopg = psycopg
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._conn: Any = None
        try:
            params = psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise StoreUnavailable(f"the PostgreSQL kernel store's address is not a connection string: {exc}") from None
        params.pop("password", None)  # never in a message
        self._where = " ".join(f"{k}={v}" for k, v in sorted(params.items()))

    def describe(self) -> str:
        return f"PostgreSQL {self._where}"

    def _execute(self, query: str, args: tuple = ()) -> list[tuple]:
        if self._conn is None or self._conn.closed:
            self._conn = self._psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self.connect_timeout)))
            for statement in _SCHEMA:
                self._conn.execute(statement)
        try:
            cursor = self._conn.execute(query, args)
            return cursor.fetchall() if cursor.description else []
        except self._psycopg.OperationalError:
            self._conn.close()  # a broken connection: the next call opens a new one
            raise

    def _put(self, kernel_id: str, blob: bytes) -> None:
        self._execute("INSERT INTO kernel_gateway_kernels (kernel_id, record, updated) VALUES (%s, %s, %s) "
                      "ON CONFLICT (kernel_id) DO UPDATE SET record = EXCLUDED.record, updated = EXCLUDED.updated",
                      (kernel_id, blob, time.time()))

    def _get(self, kernel_id: str) -> bytes | None:
        rows = self._execute("SELECT record FROM kernel_gateway_kernels WHERE kernel_id = %s", (kernel_id,))
        return bytes(rows[0][0]) if rows else None

    def _delete(self, kernel_id: str) -> None:
        self._execute("DELETE FROM kernel_gateway_kernels WHERE kernel_id = %s", (kernel_id,))

    def _all(self) -> list[tuple[str, bytes]]:
        return [(k, bytes(r)) for k, r in self._execute(
            "SELECT kernel_id, record FROM kernel_gateway_kernels ORDER BY updated")]

    def _note_activity(self, activity: dict[str, float]) -> None:
        self._execute("INSERT INTO kernel_gateway_activity (kernel_id, last_activity) SELECT a.k, a.t FROM "
                      "unnest(%s::text[], %s::float8[]) AS a(k, t) JOIN kernel_gateway_kernels ON kernel_id = a.k "
                      "ON CONFLICT (kernel_id) DO UPDATE SET last_activity = "
                      "GREATEST(kernel_gateway_activity.last_activity, EXCLUDED.last_activity)",
                      (list(activity), list(activity.values())))

    def _activity(self) -> dict[str, float]:
        return dict(self._execute("SELECT kernel_id, last_activity FROM kernel_gateway_activity"))

    def _take_lease(self, name: str, holder: str, seconds: float) -> bool:
        return bool(self._execute(
            f"INSERT INTO kernel_gateway_leases (name, holder, expires) VALUES (%s, %s, {_NOW} + %s) "
            "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires = EXCLUDED.expires "
            f"WHERE kernel_gateway_leases.holder = EXCLUDED.holder OR kernel_gateway_leases.expires < {_NOW} "
            "RETURNING holder", (name, holder, seconds)))

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
