"""``kernel-gateway specs install <provisioner>``: writes kernelspecs that run our launchers.

One subcommand per provisioner; each writes a ``kernel.json`` whose
``metadata.kernel_provisioner`` names the provisioner and carries its config, so the spec needs
nothing else to work in our gateway or in any jupyter_client host.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from traitlets import Bool, List, Unicode, default
from traitlets.config import Application

from launchers import PYTHON_LAUNCHER

__all__ = ["KubernetesSpecApp", "SSHSpecApp", "SparkKubernetesSpecApp", "SpecsApp", "YarnSparkSpecApp", "YarnSpecApp",
           "launcher_argv"]

LAUNCHER = PYTHON_LAUNCHER
IMAGE_LAUNCHER = "/usr/local/share/kernel-gateway/launch_ipykernel.py"  # in launchers/images/* (their Dockerfiles)


def launcher_argv(python: str, launcher: str, token_on_stdin: bool = True) -> list[str]:
    """The argv that runs our Python launcher with every placeholder the remote provisioners fill in.

    ``token_on_stdin`` False leaves the launch token's source to the provisioner (YARN Spark adds its own flag)."""
    return [
        python, launcher,
        "--kernel-id", "{kernel_id}",
        "--response-address", "{response_address}",
        "--public-key", "{public_key}",
        "--port-range", "{port_range}",
        "--kernel-class-name", "{kernel_class_name}",
    ] + (["--launch-token-stdin"] if token_on_stdin else [])


class _InstallApp(Application):
    """Shared options of every ``specs install`` subcommand."""

    spec_name = Unicode("", config=True, help="Directory name of the kernelspec (required).")
    display_name = Unicode("", config=True, help="Name shown in notebook UIs; default: the spec name.")
    python = Unicode("python3", config=True, help="Python interpreter on the kernel's host.")
    launcher = Unicode(str(LAUNCHER), config=True, help="Path of launch_ipykernel.py on the kernel's host.")
    port_range = Unicode("", config=True, help="Port range for the kernel's ports, 'low..high'.")
    user = Bool(False, config=True, help="Install for the current user instead of system-wide.")
    prefix = Unicode("", config=True, help="Install under this prefix (e.g. a virtualenv).")

    aliases = {
        "name": "_InstallApp.spec_name",
        "display-name": "_InstallApp.display_name",
        "python": "_InstallApp.python",
        "launcher": "_InstallApp.launcher",
        "port-range": "_InstallApp.port_range",
        "prefix": "_InstallApp.prefix",
    }
    flags = {"user": ({"_InstallApp": {"user": True}}, "Install for the current user.")}

    provisioner_name = ""

    def provisioner_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def kernel_argv(self) -> list[str]:
        """The kernel command: our launcher on the kernel's host."""
        return launcher_argv(self.python, self.launcher)

    def spec_env(self) -> dict[str, str]:
        """The kernelspec's ``env``: none unless the kind needs it."""
        return {}

    def require(self, value: Any, flag: str) -> None:
        """Exit with status 2 and a message when a required option is missing."""
        if not value:
            print(f"{self.name}: {flag} is required", file=sys.stderr)
            self.exit(2)

    def start(self) -> None:
        self.require(self.spec_name, "--name")
        config = self.provisioner_config()
        if self.port_range:
            config["port_range"] = self.port_range
        spec: dict[str, Any] = {
            "argv": self.kernel_argv(),
            "display_name": self.display_name or self.spec_name,
            "language": "python",
            "interrupt_mode": "message",
            # our launcher applies CurveZMQ when asked (--curve): transport_encryption 'auto' encrypts these kernels
            "metadata": {"kernel_provisioner": {"provisioner_name": self.provisioner_name, "config": config},
                         "supported_encryption": ["curve"]},
        }
        env = self.spec_env()
        if env:
            spec["env"] = env
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "kernel.json").write_text(json.dumps(spec, indent=2))
            dest = KernelSpecManager().install_kernel_spec(
                tmp, self.spec_name, user=self.user, prefix=self.prefix or None, replace=True
            )
        print(os.path.join(dest, "kernel.json"))


def _split(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


class SSHSpecApp(_InstallApp):
    """``specs install ssh --name N --hosts a,b``: a kernelspec for SSH-distributed kernels."""

    name = "kernel-gateway specs install ssh"
    provisioner_name = "ssh-provisioner"
    hosts = List(Unicode(), config=True, help="Hosts the kernels run on (comma-separated).")
    remote_user = Unicode("", config=True, help="User to log in as on the hosts.")
    load_balancing = Unicode("round-robin", config=True, help="round-robin or least-connection.")
    aliases = {
        **_InstallApp.aliases,
        "hosts": "SSHSpecApp.hosts",
        "remote-user": "SSHSpecApp.remote_user",
        "load-balancing": "SSHSpecApp.load_balancing",
    }

    def provisioner_config(self) -> dict[str, Any]:
        hosts = _split(self.hosts)
        self.require(hosts, "--hosts")
        config: dict[str, Any] = {"remote_hosts": hosts, "load_balancing": self.load_balancing}
        if self.remote_user:
            config["remote_user"] = self.remote_user
        return config


class DockerSpecApp(_InstallApp):
    """``specs install docker --name N --image I``: a kernelspec for kernels in Docker containers."""

    name = "kernel-gateway specs install docker"
    provisioner_name = "docker-provisioner"
    image = Unicode("", config=True, help="Kernel image (built from launchers/images/python or bootstrapped).")
    network = Unicode("", config=True, help="Docker network the kernels join.")
    bootstrap = Unicode("/usr/local/share/kernel-gateway/bootstrap-kernel.sh", config=True,
                        help="Path of bootstrap-kernel.sh inside the image.")
    aliases = {
        **_InstallApp.aliases,
        "image": "DockerSpecApp.image",
        "network": "DockerSpecApp.network",
        "bootstrap": "DockerSpecApp.bootstrap",
    }

    def kernel_argv(self) -> list[str]:
        return [self.bootstrap]

    def provisioner_config(self) -> dict[str, Any]:
        self.require(self.image, "--image")
        config: dict[str, Any] = {"image": self.image}
        if self.network:
            config["network"] = self.network
        return config


class DockerSwarmSpecApp(DockerSpecApp):
    """``specs install docker-swarm --name N --image I --network overlay``: kernels as Swarm services."""

    name = "kernel-gateway specs install docker-swarm"
    provisioner_name = "docker-swarm-provisioner"


class KubernetesSpecApp(DockerSpecApp):
    """``specs install kubernetes --name N --image I``: a kernelspec for kernels as Kubernetes pods."""

    name = "kernel-gateway specs install kubernetes"
    provisioner_name = "kubernetes-provisioner"
    namespace = Unicode("", config=True, help="Namespace of the kernel pods; empty: the gateway's own.")
    namespace_mode = Unicode("", config=True, help="'shared' (the default) or 'per-kernel'.")
    image_pull_policy = Unicode("", config=True, help="Always, IfNotPresent (the default) or Never.")
    service_account = Unicode("", config=True, help="Service account of the kernel pods.")
    aliases = {
        **_InstallApp.aliases,
        "image": "DockerSpecApp.image",
        "bootstrap": "DockerSpecApp.bootstrap",
        "namespace": "KubernetesSpecApp.namespace",
        "namespace-mode": "KubernetesSpecApp.namespace_mode",
        "image-pull-policy": "KubernetesSpecApp.image_pull_policy",
        "service-account": "KubernetesSpecApp.service_account",
    }

    def provisioner_config(self) -> dict[str, Any]:
        self.require(self.image, "--image")
        choices = {"namespace_mode": ("shared", "per-kernel"), "image_pull_policy": ("Always", "IfNotPresent", "Never")}
        for option, allowed in choices.items():
            if getattr(self, option) and getattr(self, option) not in allowed:
                print(f"{self.name}: --{option.replace('_', '-')} must be one of {', '.join(allowed)}", file=sys.stderr)
                self.exit(2)
        config: dict[str, Any] = {"image": self.image}
        for option in ("namespace", "namespace_mode", "image_pull_policy", "service_account"):
            if getattr(self, option):
                config[option] = getattr(self, option)
        return config


def _pyspark_submit() -> str:
    """``bin/spark-submit`` inside the pyspark package this Python imports (it is its own SPARK_HOME); '' if none.

    Not the wrapper pip puts beside the interpreter: that one looks for pyspark with whatever ``python3`` is first
    on the gateway's PATH."""
    spec = importlib.util.find_spec("pyspark")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, "bin", "spark-submit")
        if os.access(path, os.X_OK):
            return path
    return ""


class _SparkSpecApp(_InstallApp):
    """Options and argv shared by both Spark kernelspec kinds (spark-submit in cluster mode)."""

    spark_conf = List(Unicode(), config=True, help="Extra Spark settings, 'key=value' (repeat the option).")
    aliases = {**_InstallApp.aliases, "spark-conf": "_SparkSpecApp.spark_conf"}

    def spark_submit_argv(self, submit: list[str], name: str, conf: list[str]) -> list[str]:
        """``submit`` (spark-submit and its master) in cluster mode, application ``name``, the ``conf`` settings
        (exits with status 2 for one that is not key=value) and our launcher as the Python driver, with
        ``--spark-session``."""
        for item in conf:
            if "=" not in item:
                print(f"{self.name}: --spark-conf {item!r} is not key=value", file=sys.stderr)
                self.exit(2)
        return [*submit, "--deploy-mode", "cluster", "--name", name, *(arg for item in conf for arg in ("--conf", item)),
                *launcher_argv(self.python, self.launcher, token_on_stdin=False)[1:], "--spark-session"]


class SparkKubernetesSpecApp(KubernetesSpecApp, _SparkSpecApp):
    """``specs install spark-kubernetes --name N --image I``: kernels as Spark drivers in Kubernetes cluster mode."""

    name = "kernel-gateway specs install spark-kubernetes"
    provisioner_name = "spark-kubernetes-provisioner"
    spark_submit = Unicode(
        "", config=True, help="spark-submit on the gateway host; empty: the one in the pyspark package of this Python "
        "(bin/spark-submit under it, which needs no SPARK_HOME), else on PATH.")
    master = Unicode(
        "", config=True, help="Spark master 'k8s://https://host:port'; empty: the API server of the provisioner's "
        "kubeconfig (or in-cluster config).")
    aliases = {**KubernetesSpecApp.aliases, **_SparkSpecApp.aliases,
               "spark-submit": "SparkKubernetesSpecApp.spark_submit", "master": "SparkKubernetesSpecApp.master"}

    @default("launcher")
    def _image_launcher(self) -> str:
        return "local://" + IMAGE_LAUNCHER  # inside the Spark image (launchers/images/spark)

    def kernel_argv(self) -> list[str]:
        submit = [self.spark_submit or _pyspark_submit() or shutil.which("spark-submit") or "spark-submit"]
        if self.master:
            if not self.master.startswith("k8s://"):
                print(f"{self.name}: --master must be k8s://https://host:port", file=sys.stderr)
                self.exit(2)
            submit += ["--master", self.master]
        return self.spark_submit_argv(submit, "kernel-{kernel_id}", list(self.spark_conf))


class _YarnSpecApp(_InstallApp):
    """Options shared by both YARN kernelspec kinds."""

    rm_urls = List(Unicode(), config=True, help="ResourceManager web addresses (comma-separated; all of them with HA).")
    queue = Unicode("", config=True, help="YARN queue; empty: the provisioner's default ('default').")
    memory = Unicode("", config=True, help="Memory of the kernel's container (Spark: the driver's), e.g. '1g'.")
    vcores = Unicode("", config=True, help="Virtual cores of the kernel's container (Spark: the driver's).")
    aliases = {
        **_InstallApp.aliases,
        "rm-urls": "_YarnSpecApp.rm_urls",
        "queue": "_YarnSpecApp.queue",
        "memory": "_YarnSpecApp.memory",
        "vcores": "_YarnSpecApp.vcores",
    }

    def provisioner_config(self) -> dict[str, Any]:
        urls = _split(self.rm_urls)
        self.require(urls, "--rm-urls")
        config: dict[str, Any] = {"rm_urls": urls}
        if self.queue:
            config["queue"] = self.queue
        if self.memory:
            config["memory"] = self.memory
        if self.vcores:
            if not self.vcores.isdigit():
                print(f"{self.name}: --vcores must be a whole number", file=sys.stderr)
                self.exit(2)
            config["vcores"] = int(self.vcores)
        return config


class YarnSpecApp(_YarnSpecApp):
    """``specs install yarn --name N --rm-urls U --am-command C``: kernels as YARN applications (native mode)."""

    name = "kernel-gateway specs install yarn"
    provisioner_name = "yarn-provisioner"
    am_command = Unicode("", config=True, help="Command that runs the registering ApplicationMaster on the nodes.")
    aliases = {**_YarnSpecApp.aliases, "am-command": "YarnSpecApp.am_command"}

    def provisioner_config(self) -> dict[str, Any]:
        config = super().provisioner_config()
        self.require(self.am_command, "--am-command")
        return {**config, "am_command": self.am_command}


class YarnSparkSpecApp(_YarnSpecApp, _SparkSpecApp):
    """``specs install yarn-spark --name N --rm-urls U --spark-home S``: kernels as Spark drivers in YARN cluster mode."""

    name = "kernel-gateway specs install yarn-spark"
    provisioner_name = "yarn-spark-provisioner"
    spark_home = Unicode("", config=True, help="Spark's directory on the gateway host (spark-submit runs there).")
    hadoop_conf_dir = Unicode(
        "", config=True, help="HADOOP_CONF_DIR for spark-submit (yarn-site.xml names the ResourceManager); empty: "
        "the gateway's environment.")
    aliases = {
        **_YarnSpecApp.aliases,
        **_SparkSpecApp.aliases,
        "spark-home": "YarnSparkSpecApp.spark_home",
        "hadoop-conf-dir": "YarnSparkSpecApp.hadoop_conf_dir",
    }

    def kernel_argv(self) -> list[str]:
        self.require(self.spark_home, "--spark-home")
        conf = [f"spark.yarn.appMasterEnv.PYSPARK_PYTHON={self.python}", f"spark.executorEnv.PYSPARK_PYTHON={self.python}",
                *self.spark_conf]
        return self.spark_submit_argv([os.path.join(self.spark_home, "bin", "spark-submit"), "--master", "yarn"],
                                      "{kernel_id}", conf)

    def spec_env(self) -> dict[str, str]:
        env = {"SPARK_HOME": self.spark_home}
        if self.hadoop_conf_dir:
            env.update(HADOOP_CONF_DIR=self.hadoop_conf_dir, YARN_CONF_DIR=self.hadoop_conf_dir)
        return env


class InstallApp(Application):
    """``specs install <provisioner>``."""

    name = "kernel-gateway specs install"
    subcommands = {
        "ssh": (SSHSpecApp, SSHSpecApp.__doc__.splitlines()[0]),
        "docker": (DockerSpecApp, DockerSpecApp.__doc__.splitlines()[0]),
        "docker-swarm": (DockerSwarmSpecApp, DockerSwarmSpecApp.__doc__.splitlines()[0]),
        "kubernetes": (KubernetesSpecApp, KubernetesSpecApp.__doc__.splitlines()[0]),
        "spark-kubernetes": (SparkKubernetesSpecApp, SparkKubernetesSpecApp.__doc__.splitlines()[0]),
        "yarn": (YarnSpecApp, YarnSpecApp.__doc__.splitlines()[0]),
        "yarn-spark": (YarnSparkSpecApp, YarnSparkSpecApp.__doc__.splitlines()[0]),
    }

    def start(self) -> None:
        if self.subapp is None:
            print(f"{self.name}: name a provisioner: {', '.join(self.subcommands)}", file=sys.stderr)
            self.exit(2)
        self.subapp.start()


class SpecsApp(Application):
    """``kernel-gateway specs``: kernelspec tools."""

    name = "kernel-gateway specs"
    subcommands = {"install": (InstallApp, "Write a kernelspec for one of our provisioners.")}

    def start(self) -> None:
        if self.subapp is None:
            print(f"{self.name}: use 'specs install <provisioner>'", file=sys.stderr)
            self.exit(2)
        self.subapp.start()
