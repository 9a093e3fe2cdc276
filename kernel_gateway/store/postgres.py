"""The shared store for replicas: one PostgreSQL table, reached with psycopg 3 (the ``postgresql`` extra)."""

from __future__ import annotations

import time
from typing import Any

from .base import KernelStore, StoreUnavailable
from .crypto import RecordCipher

__all__ = ["PostgresKernelStore"]

_SCHEMA = ("CREATE TABLE IF NOT EXISTS kernel_gateway_kernels (kernel_id TEXT PRIMARY KEY, record BYTEA NOT NULL, "
           "updated DOUBLE PRECISION NOT NULL)")


class PostgresKernelStore(KernelStore):
    """Records in ``kernel_gateway_kernels``; a lost connection is opened again by the next call."""

    name = "postgresql"

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
            self._conn.execute(_SCHEMA)
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

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
