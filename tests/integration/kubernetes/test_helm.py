"""The Helm chart (``helm/``) on the real Kubernetes v1.34 test cluster (``k8s_cluster``).

``helm lint`` (and the schema refusing bad values), ``helm template`` for several value sets checked by
the API server itself (``kubectl apply --dry-run=server --validate=strict``: the cluster's OpenAPI, RBAC
escalation checks, admission), then a release with the project's gateway image: jupyter_server in
gateway mode, pointed at the gateway's Service, starts a pod kernel, runs code and shuts it down;
``helm upgrade`` to per-kernel namespaces (ClusterRole) starts one more; ``helm uninstall`` leaves nothing.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
import types
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from tests.e2e.conftest import http, start_jupyter_server
from tests.e2e.kernel_ws import KernelWebSocket
from tests.services.gateway import wait_until
from tests.services.kubernetes_build import gateway_image
from tests.services.kubernetes_cluster import KubernetesCluster

CHART = Path(__file__).resolve().parents[3] / "helm"
PORTS = "44100..44199"
START = 180  # seconds a pod kernel may take to start on 2 busy cores
INSTALL = "6m"  # helm --wait: the gateway pod pulls nothing, but the machine is busy


@pytest.fixture(scope="module")
def helm(k8s_cluster: KubernetesCluster, tmp_path_factory):
    """``helm(*args)`` / ``kubectl(*args)`` as admin on the cluster, with helm's own dirs under tmp."""
    home = tmp_path_factory.mktemp("helm-home")
    env = {"KUBECONFIG": k8s_cluster.kubeconfig, "PATH": f"{k8s_cluster.bin_dir}:/usr/bin:/bin",
           "HOME": str(home), "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}

    def run(tool: str, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 420):
        proc = subprocess.run([str(k8s_cluster.bin_dir / tool), *args], input=stdin, capture_output=True, text=True,
                              env=env, timeout=timeout)
        if check and proc.returncode:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return types.SimpleNamespace(helm=lambda *a, **kw: run("helm", *a, **kw),
                                 kubectl=lambda *a, **kw: run("kubectl", *a, **kw))


@pytest.fixture(scope="module")
def api(k8s_cluster: KubernetesCluster):
    api_client = config.new_client_from_config(config_file=k8s_cluster.kubeconfig)
    yield types.SimpleNamespace(core=client.CoreV1Api(api_client), rbac=client.RbacAuthorizationV1Api(api_client))
    api_client.close()


@pytest.fixture
def namespace(api, helm) -> str:
    """A fresh namespace for the release, deleted after the test. Pod Security "restricted" is enforced in it:
    the gateway's pod and the kernel pods must meet it (and a dry run warns of any template that would not)."""
    name = f"kgw-helm-{uuid.uuid4().hex[:8]}"
    labels = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/warn": "restricted"}
    api.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels)))
    yield name
    helm.kubectl("delete", "namespace", name, "--ignore-not-found", "--wait=false", check=False)


def render(helm, *args: str, namespace: str = "default") -> list[dict]:
    out = helm.helm("template", "rel", str(CHART), "--namespace", namespace, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


# ---------------------------------------------------------------------------------------------- lint


def test_lint_and_schema(helm):
    assert "0 chart(s) failed" in helm.helm("lint", str(CHART), "--strict").stdout
    assert helm.helm("lint", str(CHART), "--strict", "--set", "kernels.namespaceMode=per-kernel",
                     "--set", "kernels.kernelClusterRole=view", "--set", "networkPolicy.enabled=true",
                     "--set", "ingress.enabled=true", "--set", "ingress.hosts[0].host=gw.example.org",
                     "--set", "ingress.hosts[0].paths[0].path=/", "--set", "kernelStore.kind=kubernetes",
                     "--set", "kernelStore.keySecret=mine", "--set", "kernels.onStop=shutdown").returncode == 0
    # replicas share kernels only through the Kubernetes store
    assert helm.helm("lint", str(CHART), "--strict", "--set", "replicaCount=3",
                     "--set", "kernelStore.kind=kubernetes").returncode == 0
    for bad in ("kernels.namespaceMode=everywhere", "replicaCount=2", "gateway.portRange=40000-41000",
                "kernels.namespace=Not_A_Label", "gatway.port=1", "kernels.imagePullPolicy=Sometimes",
                "kernelStore.kind=etcd", "kernels.onStop=sometimes", "kernelStore.keySecret=Not_A_Name"):
        proc = helm.helm("lint", str(CHART), "--set", bad, check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "values don't meet the specifications of the schema" in output, (bad, output)


def test_template_rbac_is_least_privilege(helm):
    shared = render(helm)
    kinds = {doc["kind"] for doc in shared}
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds and "Ingress" not in kinds
    [role] = [doc for doc in shared if doc["kind"] == "Role"]
    resources = {res for rule in role["rules"] for res in rule["resources"]}
    assert resources == {"pods", "pods/log", "secrets", "events"}
    per_kernel = render(helm, "--set", "kernels.namespaceMode=per-kernel", "--set", "kernels.kernelClusterRole=view")
    assert "Role" not in {doc["kind"] for doc in per_kernel}
    [cluster_role] = [doc for doc in per_kernel if doc["kind"] == "ClusterRole"]
    [bind] = [rule for rule in cluster_role["rules"] if "bind" in rule["verbs"]]
    assert bind == {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["bind"],
                    "resourceNames": ["view"]}
    [deployment] = [doc for doc in shared if doc["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {item["name"]: item for item in container["env"]}
    token_ref = env["GATEWAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token_ref == {"name": "rel-kernel-gateway-token", "key": "token"}
    assert env["GATEWAY_RESPONSE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    [spec_map] = [doc for doc in shared if doc["kind"] == "ConfigMap"]
    spec = json.loads(spec_map["data"]["python-pod.json"])
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "kubernetes-provisioner"
    based = render(helm, "--set", "gateway.baseUrl=/gw", "--set", "auth.existingSecret=mine",
                   "--set", "auth.existingSecretKey=tok")
    assert [doc["metadata"]["name"] for doc in based if doc["kind"] == "Secret"] == ["rel-kernel-gateway-store-key"]
    [container] = [doc for doc in based if doc["kind"] == "Deployment"][0]["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/gw/readyz"
    env = {item["name"]: item for item in container["env"]}
    assert env["GATEWAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "tok"}


def gateway_pod(docs: list[dict]) -> tuple[dict, dict, dict[str, str]]:
    """The gateway's pod spec, its container, and the container's plain env values."""
    [deployment] = [doc for doc in docs if doc["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return pod, container, {item["name"]: item.get("value") for item in container["env"]}


def test_template_kernel_store(helm):
    """The store key is a file from a Secret (the chart's, kept across upgrades, or the operator's); the Kubernetes
    store gets its namespace, its own Role on secrets in the release's namespace only, and keeps kernels on stop."""
    default = render(helm, namespace="gw")
    pod, container, env = gateway_pod(default)
    assert env["GATEWAY_KERNEL_STORE"] == "sqlite" and env["GATEWAY_KERNELS_ON_STOP"] == "shutdown"
    assert "GATEWAY_KERNEL_STORE_NAMESPACE" not in env
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "store-key"]
    assert f"{mount['mountPath']}/key" == env["GATEWAY_KERNEL_STORE_KEY_FILE"] and mount["readOnly"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "store-key"]
    assert volume["secret"] == {"secretName": "rel-kernel-gateway-store-key", "defaultMode": 0o400,
                                "items": [{"key": "key", "path": "key"}]}
    [key_secret] = [d for d in default if d["kind"] == "Secret" and d["metadata"]["name"].endswith("store-key")]
    assert len(base64.b64decode(base64.b64decode(key_secret["data"]["key"]), validate=True)) == 32
    assert key_secret["metadata"]["namespace"] == "gw"
    assert not [d for d in default if d["kind"] == "Role" and d["metadata"]["name"].endswith("-store")]

    in_secrets = render(helm, "--set", "kernelStore.kind=kubernetes", "--set", "kernels.namespaceMode=per-kernel",
                        namespace="gw")
    env = gateway_pod(in_secrets)[2]
    [deployment] = [d for d in in_secrets if d["kind"] == "Deployment"]
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"  # the new pods serve the kept kernels
    assert [d for d in default if d["kind"] == "Deployment"][0]["spec"]["strategy"]["type"] == "Recreate"
    assert (env["GATEWAY_KERNEL_STORE"], env["GATEWAY_KERNEL_STORE_NAMESPACE"]) == ("kubernetes", "gw")
    assert env["GATEWAY_KERNELS_ON_STOP"] == "keep" and env["GATEWAY_INSTANCE_NAME"] == "rel-kernel-gateway"
    [role] = [d for d in in_secrets if d["kind"] == "Role"]  # per-kernel: the kernels' rules are a ClusterRole
    assert (role["metadata"]["name"], role["metadata"]["namespace"]) == ("rel-kernel-gateway-store", "gw")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "create", "update", "delete"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list", "create", "update", "delete"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}]
    [binding] = [d for d in in_secrets if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == "rel-kernel-gateway-store"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rel-kernel-gateway", "namespace": "gw"}]

    own_key = render(helm, "--set", "kernelStore.kind=kubernetes", "--set", "kernelStore.keySecret=my-key",
                     "--set", "kernelStore.keySecretKey=store.key", "--set", "kernels.onStop=shutdown",
                     "--set", "rbac.create=false")
    assert not [d for d in own_key if d["kind"] == "Secret" and d["metadata"]["name"].endswith("store-key")]
    assert not [d for d in own_key if d["kind"] in ("Role", "RoleBinding")]
    pod, _, env = gateway_pod(own_key)
    [volume] = [v for v in pod["volumes"] if v["name"] == "store-key"]
    assert volume["secret"]["secretName"] == "my-key" and volume["secret"]["items"] == [
        {"key": "store.key", "path": "key"}]
    assert env["GATEWAY_KERNELS_ON_STOP"] == "shutdown"


VALUE_SETS = {
    "defaults": [],
    "per-kernel": ["--set", "kernels.namespaceMode=per-kernel", "--set", "kernels.kernelClusterRole=view"],
    "allowed-namespaces": ["--set", "kernels.allowedNamespaces={team-a,team-b}"],
    "example-kernelspecs": ["-f", str(CHART / "examples" / "kernelspecs.yaml")],
    "kubernetes-store": ["--set", "kernelStore.kind=kubernetes"],
    "kubernetes-store-per-kernel": ["--set", "kernelStore.kind=kubernetes", "--set", "kernels.namespaceMode=per-kernel",
                                    "--set", "kernelStore.keySecret=my-key", "--set", "kernels.onStop=shutdown"],
    "everything": ["--set", "ingress.enabled=true", "--set", "ingress.className=nginx",
                   "--set", "ingress.hosts[0].host=gw.example.org", "--set", "ingress.hosts[0].paths[0].path=/",
                   "--set", "ingress.tls[0].secretName=gw-tls", "--set", "ingress.tls[0].hosts[0]=gw.example.org",
                   "--set", "networkPolicy.enabled=true", "--set", "auth.existingSecret=mine",
                   "--set", "gateway.extraEnv.GATEWAY_ALLOW_ORIGIN=https://lab.example.org",
                   "--set", "kernels.nodeSelector.disk=ssd", "--set", "kernels.tolerations={gpu:NoSchedule}",
                   "--set", "service.type=NodePort", "--set", "gateway.baseUrl=/gw/",
                   "--set-json", 'rbac.extraRules=[{"apiGroups": [""], "resources": ["services", "configmaps"], '
                                 '"verbs": ["create", "get", "list", "patch", "delete"]}]'],
}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_template_passes_server_side_dry_run(helm, namespace, values):
    """The API server accepts every object as rendered: schema (strict), names, RBAC (no escalation)."""
    kernels = f"{namespace}-kernels"
    helm.kubectl("create", "namespace", kernels)
    try:
        out = helm.helm("template", "rel", str(CHART), "--namespace", namespace,
                        "--set", f"kernels.namespace={kernels}", *values).stdout
        proc = helm.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=out)
        applied = re.findall(r"^(\S+) (?:created|configured) \(server dry run\)$", proc.stdout, re.M)
        assert len(applied) == len([d for d in yaml.safe_load_all(out) if d]), proc.stdout
        assert not proc.stderr.strip(), proc.stderr  # strict validation warns about nothing either
    finally:
        helm.kubectl("delete", "namespace", kernels, "--wait=false", check=False)


# ---------------------------------------------------------------------------------------------- install


def release_objects(helm, namespace: str, release: str) -> list[str]:
    """Everything labelled as the release's, namespaced and cluster-wide, plus its kernel pods and secrets."""
    kinds = "all,configmaps,secrets,serviceaccounts,roles,rolebindings,networkpolicies,ingresses"
    found = helm.kubectl("get", kinds, "-n", namespace, "-l", f"app.kubernetes.io/instance={release}",
                         "-o", "name").stdout.split()
    found += helm.kubectl("get", "clusterroles,clusterrolebindings", "-l", f"app.kubernetes.io/instance={release}",
                          "-o", "name").stdout.split()
    found += helm.kubectl("get", "pods,secrets,namespaces", "-A", "-l",
                          f"kernel_gateway.instance={release}-kernel-gateway", "-o", "name").stdout.split()
    return found


def answers(url: str) -> bool:
    """``GET url`` answers 200 (connection refused until kube-proxy has the new Service's rules)."""
    try:
        return http("GET", url, timeout=5).status == 200
    except OSError:
        return False


def can_i(helm, namespace: str, verb: str, resource: str, where: str | None) -> bool:
    """Whether the release's service account may ``verb resource`` in namespace ``where`` (None: cluster-wide)."""
    scope = ["-n", where] if where else ["-A"]
    proc = helm.kubectl("auth", "can-i", verb, resource, *scope,
                        f"--as=system:serviceaccount:{namespace}:kg-kernel-gateway", check=False)
    assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


def run_pod_kernel(jupyter, namespace_of_kernels: str | None, api) -> dict:
    """Through jupyter_server: a session on the gateway's default kernelspec, code run in the pod, shutdown."""
    resp = jupyter.request("POST", "/api/sessions", {"path": "helm.ipynb", "name": "helm.ipynb", "type": "notebook",
                                                      "kernel": {"name": "python-pod"}}, timeout=START + 30)
    assert resp.status == 201, (resp.status, resp.body, jupyter.log()[-3000:])
    session = resp.json()
    kid = session["kernel"]["id"]
    try:
        with KernelWebSocket(jupyter.ws_url, kid, jupyter.headers, session_id=uuid.uuid4().hex) as ws:
            ws.kernel_info(timeout=60)
            execution = ws.run("import os, socket; print(socket.gethostname(), os.getuid(), 6 * 7)", timeout=60)
        hostname, uid, answer = execution.stdout.split()
        assert hostname == f"kernel-{kid}" and uid == "1000" and answer == "42", execution.stdout
        [pod] = api.core.list_pod_for_all_namespaces(label_selector=f"kernel_gateway.kernel_id={kid}").items
        if namespace_of_kernels:
            assert pod.metadata.namespace == namespace_of_kernels
        else:  # per-kernel
            assert pod.metadata.namespace == f"kernel-{kid}"
        found = {"pod": pod.metadata.name, "namespace": pod.metadata.namespace}
    finally:
        resp = jupyter.request("DELETE", f"/api/sessions/{session['id']}", timeout=120)
        assert resp.status == 204, (resp.status, resp.body)

    def gone() -> bool:
        selector = f"kernel_gateway.kernel_id={kid}"
        return not (api.core.list_pod_for_all_namespaces(label_selector=selector).items
                    or api.core.list_secret_for_all_namespaces(label_selector=selector).items
                    or api.core.list_namespace(label_selector=selector).items)
    wait_until(gone, 120, 0.5, what=f"kernel {kid}'s pod, secret and namespace to go")
    return found


def test_install_pod_kernel_upgrade_uninstall(helm, api, namespace, k8s_cluster, tmp_path):
    image = k8s_cluster.import_image(*gateway_image())
    repository, tag = image.rsplit(":", 1)
    release = "kg"
    values = ["--set", f"image.repository={repository}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
              "--set", f"kernels.image={k8s_cluster.kernel_image}", "--set", "kernels.imagePullPolicy=Never",
              "--set", f"gateway.portRange={PORTS}", "--set", "gateway.launchTimeout=150"]
    started = time.monotonic()
    helm.helm("install", release, str(CHART), "-n", namespace, *values, "--wait", "--timeout", INSTALL)
    print(f"helm install to a ready gateway: {time.monotonic() - started:.1f}s")
    jupyter = None
    try:
        [pod] = api.core.list_namespaced_pod(namespace, label_selector=f"app.kubernetes.io/instance={release}").items
        assert pod.spec.containers[0].security_context.read_only_root_filesystem
        assert pod.spec.security_context.run_as_non_root and pod.spec.security_context.run_as_user == 1000
        service = api.core.read_namespaced_service("kg-kernel-gateway", namespace)
        assert {p.name: p.port for p in service.spec.ports} == {"http": 8888, "response": 8877}
        url = f"http://{service.spec.cluster_ip}:8888"
        secret = api.core.read_namespaced_secret("kg-kernel-gateway-token", namespace)
        token = base64.b64decode(secret.data["token"]).decode()
        assert len(token) == 48
        wait_until(lambda: answers(f"{url}/readyz"), 60, 0.2, what="the gateway through its Service")
        assert http("GET", f"{url}/api/kernels").status == 401
        specs = http("GET", f"{url}/api/kernelspecs", {"Authorization": f"token {token}"})
        assert specs.status == 200 and specs.json()["default"] == "python-pod", specs.body
        # least privilege: kernel pods and their secrets in the kernel namespace, nothing else, nowhere else
        assert all(can_i(helm, namespace, verb, "pods", namespace) for verb in ("create", "watch", "delete"))
        assert not can_i(helm, namespace, "get", "secrets", namespace)  # create/list/delete only
        assert not can_i(helm, namespace, "list", "pods", "default")
        assert not can_i(helm, namespace, "list", "pods", None)
        assert not can_i(helm, namespace, "create", "namespaces", None)
        assert not can_i(helm, namespace, "create", "deployments", namespace)

        gateway = types.SimpleNamespace(url=url, token=token)
        jupyter = start_jupyter_server(gateway, tmp_path / "jupyter")
        started = time.monotonic()
        run_pod_kernel(jupyter, namespace, api)
        print(f"pod kernel through the chart (start, code, shutdown, pod gone): {time.monotonic() - started:.1f}s")

        # upgrade: per-kernel namespaces (the Role becomes a ClusterRole); the generated token is kept
        started = time.monotonic()
        helm.helm("upgrade", release, str(CHART), "-n", namespace, *values, "--set", "kernels.namespaceMode=per-kernel",
                  "--set", "kernels.kernelClusterRole=view", "--wait", "--timeout", INSTALL)
        print(f"helm upgrade to a ready gateway: {time.monotonic() - started:.1f}s")
        secret = api.core.read_namespaced_secret("kg-kernel-gateway-token", namespace)
        assert base64.b64decode(secret.data["token"]).decode() == token
        mine = f"app.kubernetes.io/instance={release}"
        assert not api.rbac.list_namespaced_role(namespace, label_selector=mine).items
        assert not api.rbac.list_namespaced_role_binding(namespace, label_selector=mine).items
        assert api.rbac.list_cluster_role(label_selector=mine).items
        assert can_i(helm, namespace, "create", "namespaces", None) and can_i(helm, namespace, "watch", "pods", None)
        assert not can_i(helm, namespace, "create", "clusterrolebindings", None)
        assert not can_i(helm, namespace, "bind", "clusterroles/admin", None)
        assert can_i(helm, namespace, "bind", "clusterroles/view", None)
        wait_until(lambda: len(api.core.list_namespaced_pod(
            namespace, label_selector=f"app.kubernetes.io/instance={release}").items) == 1, 120, 0.5,
            what="the old gateway pod to go")
        wait_until(lambda: answers(f"{url}/readyz"), 60, 0.2, what="the new gateway through its Service")
        found = run_pod_kernel(jupyter, None, api)
        assert found["namespace"].startswith("kernel-")
    finally:
        if jupyter is not None:
            jupyter.stop()
        started = time.monotonic()
        helm.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", INSTALL, check=False)
    wait_until(lambda: not release_objects(helm, namespace, release), 120, 1,
               what="nothing of the release left after helm uninstall")
    print(f"helm uninstall until nothing is left: {time.monotonic() - started:.1f}s")


def test_replicas_share_pod_kernels_and_keep_them_across_an_upgrade(helm, api, namespace, k8s_cluster, tmp_path):
    """Two gateway replicas on the Kubernetes store behind the chart's Service: kernels started through either
    survive the other's first start (no reaping of a replica's kernels), and a rolling upgrade (new gateway pods)
    keeps every kernel and its variables; the notebook's websocket through jupyter_server carries on."""
    image = k8s_cluster.import_image(*gateway_image())
    repository, tag = image.rsplit(":", 1)
    release = "kr"
    values = ["--set", f"image.repository={repository}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
              "--set", f"kernels.image={k8s_cluster.kernel_image}", "--set", "kernels.imagePullPolicy=Never",
              "--set", f"gateway.portRange={PORTS}", "--set", "gateway.launchTimeout=150",
              "--set", "kernelStore.kind=kubernetes", "--set", "replicaCount=2"]
    helm.helm("install", release, str(CHART), "-n", namespace, *values, "--wait", "--timeout", INSTALL)
    selector = f"app.kubernetes.io/instance={release}"
    first_pods = {p.metadata.name for p in api.core.list_namespaced_pod(namespace, label_selector=selector).items}
    assert len(first_pods) == 2
    service = api.core.read_namespaced_service(f"{release}-kernel-gateway", namespace)
    url = f"http://{service.spec.cluster_ip}:8888"
    token = base64.b64decode(api.core.read_namespaced_secret(f"{release}-kernel-gateway-token", namespace)
                             .data["token"]).decode()
    wait_until(lambda: answers(f"{url}/readyz"), 60, 0.2, what="the gateways through their Service")
    jupyter = start_jupyter_server(types.SimpleNamespace(url=url, token=token), tmp_path / "jupyter")
    sessions: list[dict] = []

    def kernel_pods() -> set[str]:
        pods = api.core.list_namespaced_pod(namespace, label_selector="kernel_gateway.kernel_id").items
        return {p.metadata.labels["kernel_gateway.kernel_id"] for p in pods if p.metadata.deletion_timestamp is None}

    try:
        for i in range(4):  # kube-proxy spreads the starts over both replicas
            resp = jupyter.request("POST", "/api/sessions", {"path": f"r{i}.ipynb", "name": f"r{i}.ipynb",
                                                             "type": "notebook", "kernel": {"name": "python-pod"}},
                                   timeout=START + 30)
            assert resp.status == 201, (resp.status, resp.body, jupyter.log()[-3000:])
            sessions.append(resp.json())
        kernels = [s["kernel"]["id"] for s in sessions]
        assert set(kernels) <= kernel_pods()  # each replica's first start spared the other's kernels
        ws = KernelWebSocket(jupyter.ws_url, kernels[0], jupyter.headers, session_id=uuid.uuid4().hex)
        try:
            ws.kernel_info(timeout=60)
        except TimeoutError:
            logs = helm.kubectl("logs", "-n", namespace, "-l", selector, "--tail=300", "--prefix", check=False).stdout
            raise AssertionError(f"no kernel_info_reply through jupyter_server\n{jupyter.log()[-5000:]}\n{logs}")
        assert ws.run("kept = 6 * 7; print(kept)", timeout=60).stdout.strip() == "42"

        started = time.monotonic()
        helm.helm("upgrade", release, str(CHART), "-n", namespace, *values,
                  "--set", "gateway.extraEnv.KGW_TEST_ROLL=1", "--wait", "--timeout", INSTALL)
        wait_until(lambda: not first_pods & {p.metadata.name for p in api.core.list_namespaced_pod(
            namespace, label_selector=selector).items}, 180, 0.5, what="the old gateway pods to go")
        print(f"rolling upgrade of 2 replicas with 4 kernels: {time.monotonic() - started:.1f}s")
        assert set(kernels) <= kernel_pods()
        deadline = time.monotonic() + 120
        while True:  # jupyter_server reconnects its upstream websocket by itself; the notebook's stays open
            try:
                assert ws.run("print(kept)", timeout=10).stdout.strip() == "42"
                break
            except (TimeoutError, AssertionError):
                assert time.monotonic() < deadline and not ws.closed, jupyter.log()[-3000:]
        ws.close()
        for kid in kernels[1:]:
            with KernelWebSocket(jupyter.ws_url, kid, jupyter.headers, session_id=uuid.uuid4().hex) as other:
                other.kernel_info(timeout=60)
                assert other.run("print('alive')", timeout=60).stdout.strip() == "alive"
    finally:
        ended = [jupyter.request("DELETE", f"/api/sessions/{s['id']}", timeout=120).status for s in sessions]
        jupyter.stop()
        try:  # kept kernels outlive the chart: they are shut down first
            wait_until(lambda: not kernel_pods(), 120, 0.5, what="the sessions' kernel pods to go")
        except TimeoutError:
            logs = helm.kubectl("logs", "-n", namespace, "-l", selector, "--tail=400", "--prefix", check=False).stdout
            raise AssertionError(f"kernel pods left after their sessions ended ({ended}): {kernel_pods()}\n"
                                 f"{jupyter.log()[-4000:]}\n{logs}") from None
        finally:
            helm.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", INSTALL, check=False)
    assert ended == [204] * len(sessions), ended
    try:
        wait_until(lambda: not release_objects(helm, namespace, release), 120, 1,
                   what="nothing of the release left after the sessions ended and helm uninstall")
    except TimeoutError:
        raise AssertionError(f"left after uninstall: {release_objects(helm, namespace, release)}") from None
    records = helm.kubectl("get", "secrets", "-n", namespace, "-l", "kernel_gateway.store", "-o", "name").stdout.split()
    assert not records, records
