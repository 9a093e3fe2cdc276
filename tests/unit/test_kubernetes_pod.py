"""Kernel pod rendering (provisioners/kubernetes_pod.py and KubernetesProvisioner.pod_values): no cluster needed.

Hostile client values (YAML syntax, Jinja syntax, newlines, Unicode line separators, long names) must come
out of the template as the very same strings, in the places they were put, and change nothing else.
"""

from __future__ import annotations

import uuid

import jinja2
import pytest
import yaml
from jupyter_client.kernelspec import KernelSpec
from traitlets import TraitError

from provisioners.errors import LaunchRequestError
from provisioners.kubernetes import KubernetesProvisioner
from provisioners.kubernetes_pod import compile_template, dns_label, load_template, parse_toleration, render_pod

HOSTILE = [
    'a"b\'c',
    "line1\nline2\n  nested: true\n- item",
    "{{ 7 * 7 }}{% for x in range(3) %}x{% endfor %}{# c #}",
    "key: value",
    "- listed",
    "}} {{ ] [ & * ! | > ' \" % @ `",
    "tab\tand\rcarriage\\back",
    "sep\u2028para\u2029nel\u0085end",
    "x" * 5000,
    "",
    "null",
    "true",
    "0x1F",
]


def make_provisioner(**config) -> KubernetesProvisioner:
    spec = KernelSpec(argv=["/usr/local/share/kernel-gateway/bootstrap-kernel.sh"], display_name="k8s", language="python")
    config = {"image": "kgw/kernel:1", "port_range": "40000..40099", "instance_name": "gw-unit", **config}
    provisioner = KubernetesProvisioner(kernel_id=str(uuid.uuid4()), kernel_spec=spec, **config)
    provisioner.launch_values = {"response_address": "10.0.0.1:40000", "public_key": "PUBKEY"}
    return provisioner


def render(provisioner: KubernetesProvisioner, env: dict[str, str], namespace: str = "kernels") -> dict:
    request = provisioner.container_request(provisioner.kernel_spec.argv, env, "the-launch-token")
    values = provisioner.pod_values(request, namespace, provisioner.service_account)
    return render_pod(load_template(provisioner.pod_template), values)


def env_of(pod: dict) -> dict:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in pod["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_come_out_unchanged(value):
    provisioner = make_provisioner()
    env = {"KERNEL_USERNAME": value, "KERNEL_EXTRA": value, "KERNEL_WORKING_DIR": value}
    pod = render(provisioner, env)
    container = pod["spec"]["containers"][0]
    assert env_of(pod)["KERNEL_EXTRA"] == value
    assert env_of(pod)["KERNEL_USERNAME"] == value
    assert pod["metadata"]["annotations"]["kernel_gateway.user"] == value
    # nothing else moved: one container, the structure of the packaged template
    assert [c["name"] for c in pod["spec"]["containers"]] == ["kernel"]
    assert set(pod) == {"apiVersion", "kind", "metadata", "spec"}
    assert container["image"] == "kgw/kernel:1"
    assert pod["metadata"]["name"] == f"kernel-{provisioner.kernel_id}"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    label = pod["metadata"]["labels"]["kernel_gateway.user"]
    assert label == dns_label(value) and (label == value or len(label) <= 63)


def test_the_launch_token_is_a_secret_reference_not_a_value():
    provisioner = make_provisioner()
    pod = render(provisioner, {"KERNEL_LAUNCH_TOKEN": "client-tries-to-set-it"})
    assert "the-launch-token" not in yaml.safe_dump(pod)
    assert env_of(pod)["KERNEL_LAUNCH_TOKEN"] == {
        "secretKeyRef": {"name": f"kernel-{provisioner.kernel_id}", "key": "launch-token"}}
    env = env_of(pod)
    assert env["KERNEL_ID"] == provisioner.kernel_id
    assert env["RESPONSE_ADDRESS"] == "10.0.0.1:40000" and env["PUBLIC_KEY"] == "PUBKEY"
    assert env["PORT_RANGE"] == "40000..40099"
    assert pod["spec"]["containers"][0]["args"] == ["/usr/local/share/kernel-gateway/bootstrap-kernel.sh"]


def test_resources_security_and_operator_settings():
    provisioner = make_provisioner(max_cpus=4, max_memory="2g", max_gpus=1, node_selector={"pool": "kernels"},
                                   tolerations=["dedicated=kernels:NoSchedule", "spot"], service_account="kernel-sa",
                                   volumes=["/data:/home/jovyan/data:ro", "shared-claim:/shared"],
                                   image_pull_policy="Never")
    pod = render(provisioner, {"KERNEL_CPUS": "1.5", "KERNEL_MEMORY": "512m", "KERNEL_GPUS": "1", "KERNEL_UID": "1234",
                               "KERNEL_GID": "55"})
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    limits = {"cpu": "1500m", "memory": str(512 * 1024**2), "nvidia.com/gpu": "1"}
    assert container["resources"] == {"limits": limits, "requests": limits}
    assert spec["securityContext"]["runAsUser"] == 1234 and spec["securityContext"]["runAsGroup"] == 55
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert spec["nodeSelector"] == {"pool": "kernels"}
    assert spec["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "kernels", "effect": "NoSchedule"},
                                   {"key": "spot", "operator": "Exists"}]
    assert spec["serviceAccountName"] == "kernel-sa" and spec["automountServiceAccountToken"] is False
    assert spec["volumes"] == [{"name": "volume-0", "hostPath": {"path": "/data"}},
                               {"name": "volume-1", "persistentVolumeClaim": {"claimName": "shared-claim"}}]
    assert container["volumeMounts"] == [{"name": "volume-0", "mountPath": "/home/jovyan/data", "readOnly": True},
                                         {"name": "volume-1", "mountPath": "/shared", "readOnly": False}]
    assert container["imagePullPolicy"] == "Never"
    assert spec["restartPolicy"] == "Never" and spec["terminationGracePeriodSeconds"] == 3


@pytest.mark.parametrize("env, words", [
    ({"KERNEL_CPUS": "8"}, "above the limit"),
    ({"KERNEL_UID": "0"}, "not allowed"),
    ({"KERNEL_IMAGE": "evil/image"}, "not allowed"),
    ({"KERNEL_BAD NAME": "x"}, "not valid in a pod"),
    ({"KERNEL_X\nY": "x"}, "not valid in a pod"),
])
def test_requests_outside_the_limits_are_refused(env, words):
    with pytest.raises(LaunchRequestError, match=words):
        render(make_provisioner(max_cpus=4), env)


def test_values_without_the_filter_are_json_too():
    template = compile_template("kind: Pod\nspec: {}\nmetadata:\n  annotations:\n    a: {{ value }}\n"
                                "    b: [{{ value }}, {{ value | json }}]\n    c: {x: {{ value }}}  # note\n")
    hostile = "v\nkind: Secret\n{{ 1 + 1 }}, d: e}]"
    pod = render_pod(template, {"value": hostile, "pod_name": "kernel-1", "namespace": "ns", "labels": {}})
    assert pod["kind"] == "Pod"
    assert pod["metadata"]["annotations"] == {"a": hostile, "b": [hostile, hostile], "c": {"x": hostile}}


@pytest.mark.parametrize("text", [
    "a: x-{{ v }}\n", 'a: "{{ v }}"\n', "a: {{ v }}-x\n", "a: {{ v }}{{ w }}\n", "a: {x: y{{ v }}}\n",
    "a: {{ v }}#c\n", "a: b\n{% if v %}x{{ v }}{% endif %}\n", "a:{{ v }}\n",
])
def test_a_value_inside_a_string_is_refused(text):
    # concatenated, a JSON string is no longer one YAML scalar: '{a: x-{{ v }}}' with v = ', b: c' adds a key
    with pytest.raises(jinja2.TemplateSyntaxError, match="whole YAML value"):
        compile_template(text)


def test_render_pod_sets_what_the_watch_needs():
    template = compile_template("kind: Pod\nmetadata:\n  name: other\n  labels: {kernel_gateway.kernel_id: forged, team: a}\n"
                               "spec:\n  restartPolicy: Always\n")
    pod = render_pod(template, {"pod_name": "kernel-1", "namespace": "ns", "labels": {"kernel_gateway.kernel_id": "1"}})
    assert pod["metadata"] == {"name": "kernel-1", "namespace": "ns",
                               "labels": {"kernel_gateway.kernel_id": "1", "team": "a"}}
    assert pod["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("text", ["kind: Secret\nspec: {}\n", "- a list\n", "kind: Pod\n", "{{ missing }}"])
def test_a_template_that_does_not_render_a_pod_is_refused(text):
    with pytest.raises(ValueError):
        render_pod(compile_template(text), {"pod_name": "kernel-1", "namespace": "ns", "labels": {}})


def test_operator_template_is_checked_when_configured(tmp_path):
    bad = tmp_path / "bad.yaml.j2"
    bad.write_text("kind: Pod\n{% if %}\n")
    with pytest.raises(TraitError, match="pod_template"):
        make_provisioner(pod_template=str(bad))
    with pytest.raises(TraitError, match="pod_template"):
        make_provisioner(pod_template=str(tmp_path / "missing.yaml.j2"))
    good = tmp_path / "good.yaml.j2"
    good.write_text("apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - name: kernel\n    image: {{ image }}\n"
                    "    env: {{ env }}\n")
    pod = render(make_provisioner(pod_template=str(good)), {"KERNEL_X": "a: b"})
    assert pod["spec"]["containers"][0]["image"] == "kgw/kernel:1"
    assert env_of(pod)["KERNEL_X"] == "a: b"


@pytest.mark.parametrize("config", [{"tolerations": ["bad key=x"]}, {"tolerations": ["k=v:Sometimes"]},
                                    {"namespace": "Not_A_Label"}, {"allowed_namespaces": ["ok", "x" * 64]},
                                    {"namespace_mode": "everywhere"}])
def test_bad_operator_settings_are_refused(config):
    with pytest.raises(TraitError):
        make_provisioner(**config)


def test_dns_label():
    assert dns_label("alice") == "alice"
    assert dns_label("a.b_c-D9") == "a.b_c-D9"
    for value in ["alice@example.com", "-dash-", "x" * 64, "ünïcode", "a b", "", "...", "a\nb"]:
        label = dns_label(value)
        assert len(label) <= 63 and (label == "" or (label[0].isalnum() and label[-1].isalnum())), label
        assert all(c.isascii() and (c.isalnum() or c in "-_.") for c in label), label
    assert dns_label("x" * 64) != dns_label("x" * 65)
    assert dns_label("a@b") != dns_label("a#b")


def test_parse_toleration():
    assert parse_toleration("gpu") == {"key": "gpu", "operator": "Exists"}
    assert parse_toleration("gpu:NoExecute") == {"key": "gpu", "operator": "Exists", "effect": "NoExecute"}
    assert parse_toleration("example.com/pool=a") == {"key": "example.com/pool", "operator": "Equal", "value": "a"}
    with pytest.raises(ValueError):
        parse_toleration("a=b=c")


def _waiting_pod(reason: str, message: str) -> dict:
    """A pod object as the API server sends it while the kubelet cannot create the kernel container."""
    return {"metadata": {"name": "kernel-x", "uid": "u1"},
            "status": {"phase": "Pending", "containerStatuses": [
                {"name": "kernel", "state": {"waiting": {"reason": reason, "message": message}}}]}}


def test_a_secret_the_node_may_not_read_yet_is_waited_for_but_a_missing_one_fails_the_start():
    from provisioners.kubernetes_watch import PodState, apply_pod

    transient = PodState()
    apply_pod(transient, _waiting_pod("CreateContainerConfigError",
                                      "failed to sync secret cache: timed out waiting for the condition"))
    assert transient.failure is None and not transient.failed.is_set()
    missing = PodState()
    apply_pod(missing, _waiting_pod("CreateContainerConfigError", 'secret "kernel-x-launch" not found'))
    assert missing.failure is not None and missing.failure.kind == "config" and "not found" in missing.failure.message
