"""The kernel store contract, run against every engine: SQLite (a file) and a real PostgreSQL server.

The same tests for each store: records round-trip and replace, secrets never reach the engine in clear, a
record changed in the engine or moved under another kernel's id is refused, a store that cannot be reached
answers :class:`StoreUnavailable` naming itself (within its timeout, never a hang), and one that comes back
is used again.
"""

from __future__ import annotations

import base64
import os
import socket
import time

import pytest

from kernel_gateway.store import (KernelRecord, KernelStoreOptions, RecordCipher, StoreUnavailable, TamperedRecord,
                                  open_store)
from kernel_gateway.store.postgres import PostgresKernelStore
from kernel_gateway.store.sqlite import SQLiteKernelStore
from tests.services.gateway import free_port
from tests.services.postgres import start_postgres

KEY = base64.b64encode(os.urandom(32)).decode()
HMAC_KEY = "a3f1c0de-5ec2-e7ed-ka1e-f0r-the-s70re"


def record(kernel_id: str = "k-1", **changes) -> KernelRecord:
    fields = dict(kernel_id=kernel_id, kernel_name="python3", user="alice", created=time.time(),
                  provisioner_info={"app_id": "application_1_0001", "am_host": "node1"},
                  connection_info={"ip": "10.0.0.5", "shell_port": 40001, "key": HMAC_KEY},
                  control={"port": 40007, "key": base64.b64encode(b"control-secret").decode()})
    fields.update(changes)
    return KernelRecord(**fields)


@pytest.fixture(scope="module")
def postgres():
    server = start_postgres()
    yield server
    server.remove()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.cluster)])
async def store(request, tmp_path):
    if request.param == "sqlite":
        store = SQLiteKernelStore(tmp_path / "kernels.sqlite", RecordCipher(KEY))
    else:
        server = request.getfixturevalue("postgres")
        store = PostgresKernelStore(server.url, RecordCipher(KEY))
        await store._run(store._execute, "DELETE FROM kernel_gateway_kernels")
    yield store
    await store.close()


def raw_rows(store) -> list[tuple[str, bytes]]:
    """What the engine holds, read by the store's own engine call (no sealing involved)."""
    return store._all()


async def test_records_round_trip_and_replace(store):
    first, second = record("k-1"), record("k-2", user="bob")
    await store.put(first)
    await store.put(second)
    assert await store.get("k-1") == first and await store.get("k-2") == second
    assert await store.get("k-unknown") is None
    restarted = record("k-1", provisioner_info={"app_id": "application_1_0002"})
    await store.put(restarted)  # a restart updates the record in place
    assert await store.get("k-1") == restarted
    assert sorted(r.kernel_id for r in await store.records()) == ["k-1", "k-2"]
    await store.remove("k-1")
    await store.remove("k-1")  # removing twice is fine
    assert [r.kernel_id for r in await store.records()] == ["k-2"]


async def test_secrets_never_reach_the_engine_in_clear(store):
    await store.put(record("k-1"))
    rows = await store._run(raw_rows, store)
    blob = b"".join(data for _, data in rows)
    for secret in (HMAC_KEY.encode(), b"Y29udHJvbC1zZWNyZXQ", b"application_1_0001", b"alice"):
        assert secret not in blob


async def test_a_record_changed_in_the_store_is_refused(store, caplog):
    await store.put(record("k-1"))
    await store.put(record("k-2"))
    [(_, blob)] = [row for row in await store._run(raw_rows, store) if row[0] == "k-1"]
    flipped = blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:]
    await store._run(store._put, "k-1", flipped)
    with pytest.raises(TamperedRecord, match="does not open"):
        await store.get("k-1")
    [(_, other)] = [row for row in await store._run(raw_rows, store) if row[0] == "k-2"]
    await store._run(store._put, "k-3", other)  # k-2's sealed record moved under another kernel's id
    with pytest.raises(TamperedRecord):
        await store.get("k-3")
    assert [r.kernel_id for r in await store.records()] == ["k-2"]  # the others are left out, and said so
    assert "refusing the record of kernel k-1" in caplog.text and "refusing the record of kernel k-3" in caplog.text


async def test_a_store_key_that_differs_opens_nothing(store):
    await store.put(record("k-1"))
    other = type(store).__new__(type(store))
    other.__dict__.update(store.__dict__, _cipher=RecordCipher(base64.b64encode(os.urandom(32)).decode()))
    with pytest.raises(TamperedRecord):
        await other.get("k-1")


def test_a_store_without_a_usable_key_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.delenv("GATEWAY_KERNEL_STORE_KEY", raising=False)
    with pytest.raises(StoreUnavailable, match="GATEWAY_KERNEL_STORE_KEY_FILE"):
        open_store(KernelStoreOptions(sqlite_path=str(tmp_path / "k.sqlite")))
    with pytest.raises(StoreUnavailable, match="32 random bytes"):
        open_store(KernelStoreOptions(key="c2hvcnQ=", sqlite_path=str(tmp_path / "k.sqlite")))
    (tmp_path / "key").write_text(KEY + "\n")
    monkeypatch.setenv("GATEWAY_KERNEL_STORE_KEY_FILE", str(tmp_path / "key"))
    assert isinstance(open_store(KernelStoreOptions(sqlite_path=str(tmp_path / "k.sqlite"))), SQLiteKernelStore)


async def test_sqlite_file_is_private_and_has_one_gateway(tmp_path):
    path = tmp_path / "data" / "kernels.sqlite"
    first = SQLiteKernelStore(path, RecordCipher(KEY))
    await first.put(record("k-1"))
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in path.parent.iterdir())
    second = SQLiteKernelStore(path, RecordCipher(KEY))
    with pytest.raises(StoreUnavailable, match="in use by another gateway"):
        await second.get("k-1")
    await first.close()
    assert await second.get("k-1") == record("k-1", created=(await second.get("k-1")).created)
    await second.close()


async def test_sqlite_that_cannot_be_written_is_unavailable(tmp_path):
    (tmp_path / "file").write_text("")
    store = SQLiteKernelStore(tmp_path / "file" / "kernels.sqlite", RecordCipher(KEY))  # a file where a dir must be
    with pytest.raises(StoreUnavailable, match=r"kernel store \(SQLite .*kernels.sqlite\)"):
        await store.put(record())
    await store.close()


@pytest.mark.cluster
async def test_postgres_away_then_back(postgres):
    store = PostgresKernelStore(postgres.url, RecordCipher(KEY), connect_timeout=2)
    try:
        await store.put(record("k-away"))
        postgres.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"PostgreSQL .*port={postgres.port}"):
            await store.get("k-away")
        assert time.monotonic() - started < 10
        postgres.start()
        assert (await store.get("k-away")).kernel_id == "k-away"  # the next call connects again
        await store.remove("k-away")
    finally:
        await store.close()


@pytest.mark.cluster
async def test_postgres_nobody_listening_is_unavailable_fast():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)  # accepts the TCP connection, never answers: the connect timeout must end it
        store = PostgresKernelStore(f"postgresql://kgw:hunter2@127.0.0.1:{sock.getsockname()[1]}/kgw",
                                    RecordCipher(KEY), connect_timeout=2)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as raised:
            await store.records()
        assert time.monotonic() - started < 10 and "hunter2" not in str(raised.value)
    closed = PostgresKernelStore(f"postgresql://kgw@127.0.0.1:{free_port()}/kgw", RecordCipher(KEY), connect_timeout=2)
    with pytest.raises(StoreUnavailable, match="refused|connect"):
        await closed.put(record())
    await closed.close()
