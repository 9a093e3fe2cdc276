"""The kernel store contract, run against every engine: SQLite (a file), a real PostgreSQL server and Secrets on
the real Kubernetes API server (``k8s_cluster``, in a namespace made for this module).

The same tests for each store: records round-trip and replace, secrets never reach the engine in clear, a
record changed in the engine or moved under another kernel's id is refused, a store that cannot be reached
answers :class:`StoreUnavailable` naming itself (within its timeout, never a hang), and one that comes back
is used again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import subprocess
import time
import types
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import yaml
from kubernetes import client, config

from kernel_gateway.store import (KernelRecord, KernelStoreOptions, RecordCipher, StoreUnavailable, TamperedRecord,
                                  open_store)
from kernel_gateway.store.kubernetes import STORE_LABEL, KubernetesKernelStore, secret_name
from kernel_gateway.store.postgres import PostgresKernelStore
from kernel_gateway.store.sqlite import SQLiteKernelStore
from tests.services.gateway import free_port
from tests.services.postgres import start_postgres

KEY = base64.b64encode(os.urandom(32)).decode()
HMAC_KEY = "a3f1c0de-5ec2-e7ed-ka1e-f0r-the-s70re"


def record(kernel_id: str = "k-1", **changes) -> KernelRecord:
    fields = dict(kernel_id=kernel_id, kernel_name="python3", user="alice", created=time.time(),
                  provisioner_info={"app_id": "application_1_0001", "am_host": "node1", "control_port": 40007,
                                    "control_key": base64.b64encode(b"control-secret").decode()},
                  connection_info={"ip": "10.0.0.5", "shell_port": 40001, "key": HMAC_KEY},
                  launch={"env": {"KERNEL_USERNAME": "alice"}, "cwd": "/home/alice"})
    fields.update(changes)
    return KernelRecord(**fields)


@pytest.fixture(scope="module")
def postgres():
    server = start_postgres()
    yield server
    server.remove()


@pytest.fixture(scope="module")
def k8s(k8s_cluster):
    """A namespace made for this module's records (deleted after it), the admin API, and kubectl."""
    api_client = config.new_client_from_config(config_file=k8s_cluster.kubeconfig)
    core = client.CoreV1Api(api_client)
    namespace = f"kgw-store-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": namespace}})

    def kubectl(*args: str) -> str:
        env = {"KUBECONFIG": k8s_cluster.kubeconfig, "HOME": str(k8s_cluster.workdir)}  # its cache: not the cwd
        return subprocess.run([str(k8s_cluster.bin_dir / "kubectl"), "-n", namespace, *args], check=True, text=True,
                              capture_output=True, env=env, timeout=60).stdout

    yield types.SimpleNamespace(cluster=k8s_cluster, core=core, namespace=namespace, kubectl=kubectl)
    core.delete_namespace(namespace)
    api_client.close()


def kubernetes_store(k8s, instance: str = "", **kwargs) -> KubernetesKernelStore:
    return KubernetesKernelStore(RecordCipher(KEY), instance or f"test-{uuid.uuid4().hex[:8]}", namespace=k8s.namespace,
                                 kubeconfig=k8s.cluster.kubeconfig, **kwargs)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.cluster),
                        pytest.param("kubernetes",  # the cluster's start-up (the first build) has its own deadlines
                                     marks=[pytest.mark.cluster, pytest.mark.timeout(300, func_only=True)])])
async def store(request, tmp_path):
    if request.param == "sqlite":
        store = SQLiteKernelStore(tmp_path / "kernels.sqlite", RecordCipher(KEY))
    elif request.param == "postgresql":
        server = request.getfixturevalue("postgres")
        store = PostgresKernelStore(server.url, RecordCipher(KEY))
        await store._run(store._execute, "DELETE FROM kernel_gateway_kernels")
        await store._run(store._execute, "DELETE FROM kernel_gateway_leases")
    else:
        store = kubernetes_store(request.getfixturevalue("k8s"))  # an instance label of its own: an empty store
    yield store
    if request.param == "kubernetes":
        for kernel_id, _ in await store._run(store._all):
            await store.remove(kernel_id)
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


async def test_replicas_share_activity_and_one_lease(store):
    if not store.shared:  # one gateway alone: the lease is always its own and there is no activity to share
        assert await store.take_lease("culler", "a", 5) and await store.take_lease("culler", "b", 5)
        assert await store.activity() == {}
        return
    await store.put(record("k-1"))
    await store.put(record("k-2"))
    await store.note_activity({"k-1": 100.0, "k-2": 200.0})
    await store.note_activity({"k-1": 150.0, "k-2": 50.0})  # what another replica saw: the latest time wins
    seen = await store.activity()
    assert (seen["k-1"], seen["k-2"]) == (150.0, 200.0)
    # one holder at a time; the holder renews; once it stops renewing, the lease runs out and another takes it
    assert await store.take_lease("culler", "replica-a", 2)
    assert not await store.take_lease("culler", "replica-b", 2)
    assert await store.take_lease("culler", "replica-a", 2)
    assert await store.take_lease("other-task", "replica-b", 2)  # leases are independent by name
    deadline = time.monotonic() + 30
    while not await store.take_lease("culler", "replica-b", 2):
        assert time.monotonic() < deadline, "the lease never ran out"
        await asyncio.sleep(0.2)
    assert not await store.take_lease("culler", "replica-a", 2)


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


# ---------------------------------------------------------------------------------------------- Kubernetes


async def test_kubernetes_records_of_another_instance_are_not_seen(k8s):
    mine, other = kubernetes_store(k8s, page_size=2), kubernetes_store(k8s)
    try:
        started = time.monotonic()
        for n in range(5):
            await mine.put(record(f"k-{n}"))
        put = (time.monotonic() - started) / 5
        await other.put(record("k-other"))
        pages = mine._api.requests["GET /api/v1/namespaces/{name}/secrets"]
        started = time.monotonic()
        assert sorted(r.kernel_id for r in await mine.records()) == [f"k-{n}" for n in range(5)]
        listed = time.monotonic() - started
        print(f"Kubernetes store: put {put * 1000:.1f} ms a record; 5 records listed in 3 pages {listed * 1000:.1f} ms")
        assert mine._api.requests["GET /api/v1/namespaces/{name}/secrets"] - pages == 3  # pages of 2, 2 and 1
        assert [r.kernel_id for r in await other.records()] == ["k-other"]
        assert await other.get("k-1") is None  # read, replaced or deleted only by its own instance
        await other.remove("k-1")
        assert (await mine.get("k-1")).kernel_id == "k-1"
        with pytest.raises(StoreUnavailable, match=f"Secret kgw-kernel-k-1 exists and is not this store's "
                                                    f"\\({STORE_LABEL}: {mine.instance}\\)"):
            await other.put(record("k-1"))
    finally:
        for store, ids in ((mine, [f"k-{n}" for n in range(5)]), (other, ["k-other"])):
            for kernel_id in ids:
                await store.remove(kernel_id)
            await store.close()


async def test_kubernetes_secret_shows_no_secret(k8s):
    store = kubernetes_store(k8s)
    kernel_id = str(uuid.uuid4())
    try:
        await store.put(record(kernel_id))
        shown = k8s.kubectl("get", "secret", secret_name(kernel_id), "-o", "json")
        secret = json.loads(shown)
        assert secret["metadata"]["name"] == f"kgw-kernel-{kernel_id}"
        assert secret["metadata"]["labels"] == {"kernel_gateway.kernel_id": kernel_id, STORE_LABEL: store.instance}
        assert secret["metadata"]["annotations"] == {"kernel_gateway.kernel_id": kernel_id}
        assert list(secret["data"]) == ["record"]
        sealed = base64.b64decode(secret["data"]["record"])
        assert sealed.startswith(b"KGS1")
        for text in (shown.encode(), sealed):  # neither the object as kubectl shows it nor the decoded blob
            for secret_text in (HMAC_KEY.encode(), base64.b64encode(HMAC_KEY.encode()), b"Y29udHJvbC1zZWNyZXQ",
                                b"control-secret", b"alice", b"application_1_0001"):
                assert secret_text not in text
        # a record under a kernel id that is no DNS name still gets a valid Secret name, and the exact id back
        odd = "Kernel_ID.With/Odd:Chars"
        await store.put(record(odd))
        assert (await store.get(odd)).kernel_id == odd and secret_name(odd).startswith("kgw-kernel-kernel-id-with-")
        assert sorted(r.kernel_id for r in await store.records()) == sorted([kernel_id, odd])
        await store.remove(odd)
        await store.remove(kernel_id)
        assert await store.records() == []
    finally:
        await store.close()


def write_kubeconfig(path, server: str, token: str, ca: str | None = None) -> str:
    cluster = {"server": server, **({"certificate-authority": ca} if ca else {"insecure-skip-tls-verify": True})}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": cluster}], "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return str(path)


async def test_kubernetes_api_server_silent_or_closed_is_unavailable_in_time(tmp_path):
    token = "hunter2-" + uuid.uuid4().hex
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)  # accepts TCP connections, never answers (not even the TLS handshake)
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"https://127.0.0.1:{sock.getsockname()[1]}", token)
        store = KubernetesKernelStore(RecordCipher(KEY), "silent", namespace="ns", kubeconfig=kubeconfig, timeout=2)
        for call in (store.records(), store.put(record()), store.get("k-1"), store.remove("k-1"),
                     store.note_activity({"k-1": 1.0}), store.activity(), store.take_lease("culler", "a", 5)):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="did not answer within 2s") as raised:
                await call
            assert time.monotonic() - started < 6, "a silent API server held the call past the timeout"
            assert token not in str(raised.value) and "127.0.0.1" in str(raised.value)
        await store.close()
    kubeconfig = write_kubeconfig(tmp_path / "closed", f"https://127.0.0.1:{free_port()}", token)
    closed = KubernetesKernelStore(RecordCipher(KEY), "closed", namespace="ns", kubeconfig=kubeconfig, timeout=2)
    with pytest.raises(StoreUnavailable, match="cannot connect to the API server: .*refused") as raised:
        await closed.put(record())
    assert token not in str(raised.value)
    await closed.close()


async def test_kubernetes_refused_credentials_say_so(k8s, tmp_path):
    """A service account without permissions on secrets: 403 with the missing verbs; a wrong token: 401."""
    account = "kgw-store-nobody"
    k8s.core.create_namespaced_service_account(k8s.namespace, {"metadata": {"name": account}})
    token = k8s.core.create_namespaced_service_account_token(
        account, k8s.namespace, {"spec": {"expirationSeconds": 600}}).status.token
    ca = str(k8s.cluster.pki / "ca.crt")
    for name, secret, match in (("forbidden", token, "403 .*forbidden.*needs get, list, create, update and delete "
                                 f"on secrets in namespace {k8s.namespace}"),
                                ("wrong", "not-" + token[:40], "401 Unauthorized: the API server does not accept")):
        kubeconfig = write_kubeconfig(tmp_path / name, k8s.cluster.api_url, secret, ca)
        store = KubernetesKernelStore(RecordCipher(KEY), "refused", namespace=k8s.namespace, kubeconfig=kubeconfig)
        for call in (store.put(record()), store.records()):
            with pytest.raises(StoreUnavailable, match=match) as raised:
                await call
            assert secret not in str(raised.value) and secret[-20:] not in str(raised.value)
        await store.close()


def configmap_writes(store: KubernetesKernelStore) -> int:
    """The POSTs and PUTs of ConfigMaps the store's client made (a PUT's path names the ConfigMap)."""
    return sum(n for key, n in store._api.requests.items()
               if key.split()[0] in ("POST", "PUT") and "/configmaps" in key)


def activity_configmaps(k8s, store: KubernetesKernelStore) -> dict[str, dict[str, float]]:
    """The activity ConfigMaps of the store's instance, as the admin sees them: name -> {kernel id: time}."""
    found = k8s.core.list_namespaced_config_map(k8s.namespace, label_selector=f"{STORE_LABEL}={store.instance}")
    return {c.metadata.name: json.loads(c.data["activity"]) for c in found.items}


async def test_kubernetes_activity_is_one_write_per_batch_and_forgets_removed_kernels(k8s):
    """Two replicas (one instance): a ConfigMap each, written once per batch whatever its size; the latest time
    per kernel across both; a removed kernel's entry leaves its writer's ConfigMap at the next write; a closed
    store removes its own ConfigMap."""
    a = kubernetes_store(k8s)
    b = kubernetes_store(k8s, instance=a.instance)
    ids, closed = [f"k-{n}" for n in range(40)], []
    try:
        for kernel_id in ids:
            await a.put(record(kernel_id))
        await a.note_activity({kernel_id: 100.0 for kernel_id in ids} | {"k-no-record": 500.0})
        before = configmap_writes(a)
        started = time.monotonic()
        await a.note_activity({kernel_id: 110.0 + n for n, kernel_id in enumerate(ids)})  # 40 kernels: one write
        noted = time.monotonic() - started
        assert configmap_writes(a) - before == 1
        await b.note_activity({"k-1": 300.0, "k-2": 50.0})
        started = time.monotonic()
        seen = await b.activity()
        read = time.monotonic() - started
        print(f"Kubernetes store: 40 kernels' activity noted in {noted * 1000:.1f} ms, read back in {read * 1000:.1f} ms")
        assert "k-no-record" not in seen  # a kernel without a record is ignored
        assert (seen["k-0"], seen["k-1"], seen["k-2"], seen["k-39"]) == (110.0, 300.0, 112.0, 149.0)
        written = activity_configmaps(k8s, a)
        assert len(written) == 2 and all(name.startswith(f"kgw-activity-{a.instance}-") for name in written)
        before = configmap_writes(a)
        await a.note_activity({"k-1": 110.0})  # nothing later than what it wrote: no write at all
        assert configmap_writes(a) == before
        for kernel_id in ids[1:]:
            await a.remove(kernel_id)
        await a.note_activity({"k-0": 400.0})
        assert sorted(map(sorted, activity_configmaps(k8s, a).values())) == [["k-0"], ["k-1", "k-2"]]
        assert await a.activity() == {"k-0": 400.0, "k-1": 300.0, "k-2": 50.0}  # b has not written since
        await b.note_activity({"k-0": 1.0})
        assert await a.activity() == {"k-0": 400.0}
        await a.close()
        closed.append(a)
        assert list(activity_configmaps(k8s, b).values()) == [{"k-0": 1.0}]  # a's went with it, b's stays
        assert await b.activity() == {"k-0": 1.0}
        await b.close()
        closed.append(b)
        assert activity_configmaps(k8s, b) == {}
    finally:
        for store in (a, b):
            if store not in closed:
                await store.close()
        cleanup = kubernetes_store(k8s, instance=a.instance)  # a closed store's thread is gone
        for kernel_id, _ in await cleanup._run(cleanup._all):
            await cleanup.remove(kernel_id)
        await cleanup.close()


async def test_kubernetes_lease_is_a_lease_object(k8s):
    """A coordination.k8s.io Lease, labelled with the store and named DNS-safe, renewed in place; another
    instance's lease of the same name is its own; and a lease whose renewTime is far ahead (its holder's clock
    runs fast) still runs out once it has stood unchanged for its duration."""
    store, other = kubernetes_store(k8s), kubernetes_store(k8s)
    leases = client.CoordinationV1Api(k8s.core.api_client)
    try:
        assert await store.take_lease("Culler/Of Kernels", "replica-a", 30)
        [lease] = leases.list_namespaced_lease(k8s.namespace, label_selector=f"{STORE_LABEL}={store.instance}").items
        assert lease.metadata.name.startswith(f"kgw-lease-{store.instance}-culler-of-kernels-")
        assert lease.metadata.annotations == {"kernel_gateway.lease": "Culler/Of Kernels"}
        assert (lease.spec.holder_identity, lease.spec.lease_duration_seconds) == ("replica-a", 30)
        shown = json.loads(k8s.kubectl("get", "lease", lease.metadata.name, "-o", "json"))
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", shown["spec"]["renewTime"])  # a MicroTime
        assert await store.take_lease("Culler/Of Kernels", "replica-a", 30)
        renewed = leases.read_namespaced_lease(lease.metadata.name, k8s.namespace)
        assert renewed.spec.renew_time > lease.spec.renew_time and renewed.spec.acquire_time == lease.spec.acquire_time
        assert not await store.take_lease("Culler/Of Kernels", "replica-b", 30)
        assert await other.take_lease("Culler/Of Kernels", "replica-b", 30)  # another instance: another Lease

        ahead = datetime.now(timezone.utc) + timedelta(hours=1)
        leases.create_namespaced_lease(k8s.namespace, {
            "metadata": {"name": f"kgw-lease-{store.instance}-skewed", "labels": {STORE_LABEL: store.instance},
                         "annotations": {"kernel_gateway.lease": "skewed"}},
            "spec": {"holderIdentity": "fast-clock", "leaseDurationSeconds": 2,
                     "renewTime": ahead.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}})
        started = time.monotonic()
        assert not await store.take_lease("skewed", "replica-a", 2)
        deadline = started + 30
        while not await store.take_lease("skewed", "replica-a", 2):
            assert time.monotonic() < deadline, "a lease renewed 'in the future' never ran out"
            await asyncio.sleep(0.2)
        assert time.monotonic() - started >= 2
        taken = leases.read_namespaced_lease(f"kgw-lease-{store.instance}-skewed", k8s.namespace)
        assert (taken.spec.holder_identity, taken.spec.lease_transitions) == ("replica-a", 1)
    finally:
        await store.close()
        await other.close()


def chart_store_role_rules(k8s, tmp_path) -> list[dict]:
    """The rules of the Helm chart's store Role (``kernelStore.kind=kubernetes``), as ``helm template`` renders them."""
    chart = os.path.join(os.path.dirname(__file__), "..", "..", "..", "helm")
    out = subprocess.run([str(k8s.cluster.bin_dir / "helm"), "template", "rel", chart, "--set",
                          "kernelStore.kind=kubernetes"], check=True, text=True, capture_output=True, timeout=120,
                         env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}).stdout
    [role] = [doc for doc in yaml.safe_load_all(out) if doc and doc["kind"] == "Role"
              and doc["metadata"]["name"] == "rel-kernel-gateway-store"]
    return role["rules"]


def account_kubeconfig(k8s, tmp_path, account: str, rules: list[dict]) -> str:
    """A service account bound to a Role with ``rules`` in the test namespace; a kubeconfig with its token."""
    rbac = client.RbacAuthorizationV1Api(k8s.core.api_client)
    k8s.core.create_namespaced_service_account(k8s.namespace, {"metadata": {"name": account}})
    rbac.create_namespaced_role(k8s.namespace, {"metadata": {"name": account}, "rules": rules})
    rbac.create_namespaced_role_binding(k8s.namespace, {
        "metadata": {"name": account}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                   "name": account},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": k8s.namespace}]})
    token = k8s.core.create_namespaced_service_account_token(
        account, k8s.namespace, {"spec": {"expirationSeconds": 600}}).status.token
    return write_kubeconfig(tmp_path / account, k8s.cluster.api_url, token, str(k8s.cluster.pki / "ca.crt"))


async def test_kubernetes_chart_role_is_enough_and_a_missing_rule_is_named(k8s, tmp_path):
    """The chart's store Role allows every call of the store; with secrets alone, the activity and the lease
    fail with a 403 naming the verbs on configmaps and on leases they need."""
    rules = chart_store_role_rules(k8s, tmp_path)
    assert {res for rule in rules for res in rule["resources"]} == {"secrets", "configmaps", "leases"}
    allowed = KubernetesKernelStore(RecordCipher(KEY), "chart-role", namespace=k8s.namespace,
                                    kubeconfig=account_kubeconfig(k8s, tmp_path, "kgw-store-chart", rules))
    await allowed.put(record("k-1"))
    assert [r.kernel_id for r in await allowed.records()] == ["k-1"] and await allowed.get("k-1") is not None
    await allowed.note_activity({"k-1": 100.0})
    await allowed.note_activity({"k-1": 200.0})
    assert await allowed.activity() == {"k-1": 200.0}
    assert await allowed.take_lease("culler", "a", 5) and await allowed.take_lease("culler", "a", 5)
    assert not await allowed.take_lease("culler", "b", 5)
    await allowed.remove("k-1")
    await allowed.close()
    assert activity_configmaps(k8s, allowed) == {}  # its ConfigMap went with it

    secrets_only = [rule for rule in rules if rule["resources"] == ["secrets"]]
    refused = KubernetesKernelStore(RecordCipher(KEY), "secrets-only", namespace=k8s.namespace,
                                    kubeconfig=account_kubeconfig(k8s, tmp_path, "kgw-store-secrets", secrets_only))
    await refused.put(record("k-2"))
    configmaps = f"403 .*forbidden.*needs list, create, update and delete on configmaps in namespace {k8s.namespace}"
    with pytest.raises(StoreUnavailable, match=f"cannot write the kernels' activity: {configmaps}"):
        await refused.note_activity({"k-2": 1.0})
    with pytest.raises(StoreUnavailable, match=f"cannot read the kernels' activity: {configmaps}"):
        await refused.activity()
    with pytest.raises(StoreUnavailable, match="cannot take the lease culler: 403 .*forbidden.*needs get, create and "
                                               "update on leases \\(API group coordination.k8s.io\\)"):
        await refused.take_lease("culler", "a", 5)
    await refused.remove("k-2")
    await refused.close()


def test_kubernetes_options(monkeypatch):
    monkeypatch.setenv("GATEWAY_KERNEL_STORE", "kubernetes")
    monkeypatch.setenv("GATEWAY_KERNEL_STORE_NAMESPACE", "kernels")
    monkeypatch.setenv("GATEWAY_INSTANCE_NAME", "gw-a")
    monkeypatch.delenv("GATEWAY_KERNEL_STORE_INSTANCE", raising=False)
    store = open_store(KernelStoreOptions(key=KEY))
    assert isinstance(store, KubernetesKernelStore) and (store.namespace, store.instance) == ("kernels", "gw-a")
    assert "kernel_gateway.store=gw-a in namespace kernels" in store.describe()
    monkeypatch.setenv("GATEWAY_KERNEL_STORE_INSTANCE", "shared")
    monkeypatch.delenv("GATEWAY_KERNEL_STORE_NAMESPACE")
    store = open_store(KernelStoreOptions(key=KEY))
    assert (store.namespace, store.instance) == ("", "shared")  # the gateway's own, found at the first call
